"""The compile options users pass: ``dynamic=True`` (a server's setting, against recompiles), ``False``
and the default; ``torch.compile(model, ...)`` and ``model.compile(...)``; fp32, bf16 and fp16;
``torch.no_grad`` and ``torch.inference_mode``. Each row prunes and equals the eager reference of
the same algorithm in the same dtype. Every value of every option appears for both models (LLaVA's
defaults in the support matrix; a covering set, not the whole product: the suite stays cheap); the
server's row (``dynamic=True``, bf16, ``inference_mode``) runs through Inductor, where
``dynamic=True`` makes the attention's scale a graph value Inductor wants specialised (Dynamo
retraces the frame: the backend lets it)."""

from __future__ import annotations

import pytest
import torch

from conftest import build
from era_compile import ERAConfig, make_era_backend
from era_compile.reference import EagerReference

DTYPES = {"fp32": (torch.float32, 1e-4), "bf16": (torch.bfloat16, 3e-2), "fp16": (torch.float16, 5e-3)}
GRAD = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
# (model, dynamic, how it is compiled, dtype, grad mode, inner compiler). The defaults (dynamic
# unset, torch.compile, fp32, no_grad, eager) are the support matrix's forward on every architecture
# (tests/test_architectures.py), the same check: not compiled again here.
ROWS = [
    ("llava", True, "model.compile", "bf16", "inference_mode", "inductor"),
    ("llava", False, "torch.compile", "fp16", "inference_mode", "eager"),
    ("qwen2-vl", True, "torch.compile", "fp32", "no_grad", "eager"),
    ("qwen2-vl", None, "model.compile", "fp16", "inference_mode", "eager"),
    ("qwen2-vl", False, "model.compile", "bf16", "no_grad", "eager"),
]


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize(
    "name, dynamic, how, dtype, grad, compiler", ROWS, ids=["-".join(str(x) for x in row) for row in ROWS]
)
def test_every_compile_option_prunes_and_equals_the_reference(name, dynamic, how, dtype, grad, compiler):
    model, inputs = build(name)
    dtype, tol = DTYPES[dtype]
    model, inputs = model.to(dtype), _cast(inputs, dtype)
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler=compiler, strict=True)
    with GRAD[grad]():
        expected = EagerReference(model, config)(**inputs).logits
    backend = make_era_backend(config)
    if how == "model.compile":
        model.compile(backend=backend, dynamic=dynamic)
        compiled = model
    else:
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with GRAD[grad]():
        out = compiled(**inputs).logits
    report = backend.report
    assert report.pruned_calls == 1 and not report.fallbacks, str(report)
    assert out.shape == expected.shape and out.dtype == dtype
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= tol * max(1.0, scale)
