"""Every image-text-to-text model type of the installed transformers: supported or refused with a reason.

For each type (``era_compile.registry``) this builds a tiny model and decides its status:

* **supported**: compiled in strict mode it prunes, and equals the eager reference (forward,
  batch 2, greedy generate) and the independent oracle (``tests/oracle.py``);
* **refused**: strict mode raises with a reason (or the type is not the architecture
  era_compile prunes: ``registry.Refusal``), and the default mode runs it unpruned, equal to the
  plain model, with a warning: never broken, never silent;
* **untested**: no tiny model of it could be built here (the reason says why). A model whose own
  eager forward fails on a text-only prompt as well is refused: the installed transformers' bug.

Anything else fails the test: a crash, a silently unpruned image prompt, a mismatch.

The default suite runs ``SUITE_TYPES``, one per pattern, and checks their rows in docs/support.md;
``scripts/registry_matrix.py`` runs every type (``ERA_REGISTRY_MATRIX=1``) and writes the
matrix there. Each run writes its statuses to ``$ERA_REGISTRY_OUT/<type>.json`` when set.
"""

from __future__ import annotations

import json
import os
import re
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin

import oracle
from conftest import compiled_generate, greedy, logits_difference
from era_compile import ERAConfig, make_era_backend, registry
from era_compile.algorithms import kept_count
from era_compile.backend import EraCompileError
from era_compile.compact_kv import CompactKV
from era_compile.compat import output_cache
from era_compile.reference import EagerReference
from oracle import FIXED, last_logits

TOL = 1e-4
ORACLE_TOL = 1e-5
SUPPORT_DOC = Path(__file__).resolve().parent.parent / "docs" / "support.md"
FULL = os.environ.get("ERA_REGISTRY_MATRIX") == "1"
# What the suite can afford of the matrix: Gemma 3 (vmap-ed bidirectional image masks, sliding-window
# caches), Qwen3-VL (DeepStack: a decoder split into per-layer graphs, each from K cut at its entry), and two
# refusals read off the config.
SUITE_TYPES = ("gemma3", "qwen3_vl", "florence2", "fast_vlm")
ALL_TYPES = list(registry.model_types())
TYPES = ALL_TYPES if FULL else [t for t in SUITE_TYPES if t in ALL_TYPES]


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:240]


def refusal_reason(error: BaseException) -> str:
    """The backend's reason, without graph and node names (stable across versions)."""
    text = _short(error)
    text = re.sub(r"^era_compile, graph \d+: ", "", text)
    text = re.sub(r"^pruning did not happen: ", "", text)
    return re.sub(r"^[a-z_]+\d*: ", "", text)


def _era_error(error: BaseException):
    while error is not None:
        if isinstance(error, EraCompileError):
            return error
        error = error.__cause__ or getattr(error, "inner_exception", None)
    return None


def _forward(model, inputs, config):
    torch._dynamo.reset()
    backend = make_era_backend(config)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs)
    return out, backend.report


def _visual(model, inputs):
    return inputs["input_ids"] == registry.image_token_id(model.config)


def logits_error(logits: torch.Tensor, reference: EagerReference, expected: torch.Tensor) -> float:
    """The largest difference from the reference's logits, of the kept tokens. A decoder split into
    per-layer graphs hands its head every position (its layers write their kept states back for the
    loop between them, ``passes/restore.py``): its logits are read at the positions the reference kept."""
    if logits.shape[1] != expected.shape[1]:
        keep = reference.last["keep_index"]
        logits = logits.gather(1, keep[..., None].expand(-1, -1, logits.shape[-1]))
    return (logits - expected).abs().max().item()


def check_supported(model, inputs) -> dict:
    """The strict checks of a type that prunes; raises AssertionError on any mismatch."""
    # a hybrid decoder is cut at a softmax-attention layer: the first from 1 on (from 2 on for generate)
    config = ERAConfig(layer=registry.first_attention_layer(model, 1), keep_ratio=0.25, compiler="eager", strict=True)
    out, report = _forward(model, inputs, config)
    reference = EagerReference(model, config)
    expected = reference(**inputs)
    (site,) = report.pruning
    assert site.kept < site.visual_tokens and site.seq_len_after < site.seq_len_before
    forward_error = logits_error(out.logits, reference, expected.logits)
    assert forward_error <= TOL, f"forward: {forward_error:.2e} from the reference"

    # the oracle: K = 0, fixed anchors, nothing recycled or rectified. A hybrid decoder's layer 0 has no
    # softmax attention to cut at, and its linear layers no mask to hide tokens by: the reference alone checks it
    oracle_error = None
    if registry.first_attention_layer(model, 0) == 0:
        oracle_config = ERAConfig(
            layer=0, keep_ratio=0.25, strategy=FIXED, recycle=False, rectify=False, compiler="eager", strict=True
        )
        out0, _ = _forward(model, inputs, oracle_config)
        visual = _visual(model, inputs)
        k = kept_count(int(visual[0].sum()), keep_ratio=0.25)
        oracle_error = (out0.logits[:, -1] - last_logits(model, inputs, visual, k)).abs().max().item()
        assert oracle_error <= ORACLE_TOL, f"oracle: {oracle_error:.2e}"

    batch = registry.make_inputs(model, batch=2, seed=1)
    try:
        out2, report2 = _forward(model, batch, config)
    except Exception as e:
        e.era_inputs = batch
        raise
    reference2 = EagerReference(model, config)
    expected2 = reference2(**batch)
    batch_error = logits_error(out2.logits, reference2, expected2.logits)
    assert report2.pruned and batch_error <= TOL, f"batch 2: {batch_error:.2e} from the reference"

    generate = ERAConfig(layer=registry.first_attention_layer(model, 2), keep_ratio=0.25, compiler="eager", strict=True)
    reference = EagerReference(model, generate).generate(**inputs, **greedy(4))
    generated, backend = _compiled_generate(model, inputs, generate, greedy(4))
    if backend.report.graphs == 0 and type(model).generate is not GenerationMixin.generate:
        raise GenerateBypassesForward(forward_error, oracle_error, batch_error)
    generate_error = _generate_error(generated, reference, backend, "generate")
    measured = {
        "forward": forward_error,
        "oracle": oracle_error,
        "batch 2": batch_error,
        "generate": generate_error,
        "visual_tokens": site.visual_tokens,
        "kept": site.kept,
        "layers": [config.layer, generate.layer],
    }
    if registry.hybrid_layers(model):
        measured["hybrid"] = registry.hybrid_layers(model)
    window = registry.sliding_window(model.config)
    return measured if window is None else {**measured, "window": window, "prompt": inputs["input_ids"].shape[1]}


# A window every prompt of ``registry.make_inputs`` fills (5 + 1 or more visual + 7 tokens), so that decode
# runs past it: the real windows (512 to 4096) are longer than the prompts, as users' prompts are.
FILLED_WINDOW = 12


def check_window_filled(model_type: str) -> dict:
    """A windowed type again, with a window its prompt fills and 8 generated tokens that run past it:
    pruned generate against the reference (K = 2), and against the oracle in every step (K = 0, fixed
    anchors, nothing recycled or rectified)."""
    model, inputs = registry.build(model_type, window=FILLED_WINDOW)
    layer = registry.first_attention_layer(model, 2)
    config = ERAConfig(layer=layer, keep_ratio=0.25, compiler="eager", strict=True)
    reference = EagerReference(model, config).generate(**inputs, **greedy(8))
    generated, backend = _compiled_generate(model, inputs, config, greedy(8))
    filled_error = _generate_error(generated, reference, backend, "generate past a filled window")
    if registry.first_attention_layer(model, 0) != 0:  # a hybrid decoder: no K = 0 oracle (check_supported)
        return {"filled_window": FILLED_WINDOW, "generate filled": filled_error, "generate oracle": None}

    oracle_config = ERAConfig(
        layer=0, keep_ratio=0.25, strategy=FIXED, recycle=False, rectify=False, compiler="eager", strict=True
    )
    visual = _visual(model, inputs)
    k = kept_count(int(visual[0].sum()), keep_ratio=0.25)
    expected = oracle.generate(model, inputs, visual, k, **greedy(8))
    generated, backend = _compiled_generate(model, inputs, oracle_config, greedy(8))
    oracle_error = _generate_error(generated, expected, backend, "generate against the oracle past a filled window")
    return {"filled_window": FILLED_WINDOW, "generate filled": filled_error, "generate oracle": oracle_error}


def _compiled_generate(model, inputs, config, generate_kwargs: dict):
    """``conftest.compiled_generate`` after a fresh Dynamo: each check compiles the model anew."""
    torch._dynamo.reset()
    return compiled_generate(model, inputs, config, generate_kwargs)


def _generate_error(generated, expected, backend, what: str) -> float:
    assert torch.equal(generated.sequences, expected.sequences), f"{what}: other tokens than the reference"
    error = logits_difference(generated, expected)
    assert error <= TOL and backend.report.pruned, f"{what}: {error:.2e} from the reference"
    assert backend.report.decode_rewrites > 0 or _compact_cache(generated), (
        f"{what}: no decode step attended over a pruned cache"
    )
    return error


def _compact_cache(generated) -> bool:
    """The generated cache holds a pruned layer's ``CompactKV`` (a decode graph that reads it may have been
    left unchanged: its cache write outside the graph, the CompactKV's own attention adding the bias)."""
    cache = output_cache(generated)
    return any(isinstance(getattr(layer, "keys", None), CompactKV) for layer in getattr(cache, "layers", ()))


class GenerateBypassesForward(Exception):
    """The type's own ``generate`` merges the image and calls its language model's ``generate``:
    the compiled forward never runs there (BLIP-2's family), so nothing the backend can see."""

    def __init__(self, forward: float, oracle: float, batch: float):
        super().__init__()
        self.measured = {"forward": forward, "oracle": oracle, "batch 2": batch}

    reason = (
        "its own generate() merges the image and runs its language model's generate(): model.compile never "
        "sees the prompt, so generate is not pruned, and nothing can say so (the compiled forward prunes)"
    )


def check_refused(model, inputs, reason: str) -> dict:
    """Refused in strict mode: the default mode must still run the model, equal to plain, and say so."""
    with torch.no_grad():
        plain = model(**inputs).logits
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, report = _forward(model, inputs, config)  # raising here is a crash: the test fails
    said = [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "era_compile" in str(w.message)
    ]
    assert said, f"refused ({reason}) but the default mode ran without a warning: silently unpruned"
    error = (out.logits - plain).abs().max().item()
    assert error <= TOL, f"the fallback differs from the plain model by {error:.2e}"
    return {"fallback_error": error, "warning": said[0][:200]}


def status_of(model_type: str) -> dict:
    try:
        model, inputs = registry.build(model_type)
    except registry.Refusal as refusal:
        return {"status": "refused", "reason": refusal.reason}  # not built: nothing to run
    except Exception as e:  # a gap of the builder, not a verdict on the model type
        return {"status": "untested", "reason": f"no tiny model built here: {type(e).__name__}: {_short(e)}"}
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as e:
        return _eager_failure(model, inputs, e)
    try:
        measured = check_supported(model, inputs)
    except GenerateBypassesForward as bypass:
        return {"status": "refused", "reason": bypass.reason, **bypass.measured}
    except Exception as e:
        era = _era_error(e)
        if era is None:
            raise
        reason = refusal_reason(era)
        refused_inputs = getattr(e, "era_inputs", inputs)  # the prompt (batch 1 or 2) that was refused
        return {"status": "refused", "reason": reason, **check_refused(model, refused_inputs, reason)}
    # its prompt is shorter than the real window: once more with one it fills (the suite's windows are
    # tests/test_windows.py's, a ragged batch past a filled window against the oracle)
    if "window" in measured and FULL:
        measured.update(check_window_filled(model_type))
    return {"status": "supported", **measured}


def _eager_failure(model, inputs, error: Exception) -> dict:
    """The plain model fails on the image prompt: on a text-only prompt too, it is the installed
    transformers' own bug (nothing era_compile can run, nor plain torch.compile); else our inputs'."""
    import transformers

    text = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    ids = inputs["input_ids"]
    text["input_ids"] = torch.where(_visual(model, inputs), ids[:, :1], ids)  # the prompt's first text token
    try:
        with torch.no_grad():
            model(**text)
    except Exception as again:
        return {
            "status": "refused",
            "reason": (
                f"transformers {transformers.__version__}'s own {type(model).__name__}.forward fails on every prompt, "
                f"text-only too ({type(again).__name__}: {_short(again)}): nothing to compile"
            ),
        }
    return {
        "status": "untested",
        "reason": f"the tiny model's eager forward fails: {type(error).__name__}: {_short(error)}",
    }


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", TYPES)
def test_model_type(model_type):
    try:
        result = status_of(model_type)
    except BaseException as e:  # the matrix names the failure, and the test still fails
        _record(model_type, {"status": "failing", "reason": failure_of(e)})
        raise
    _record(model_type, result)
    assert result["status"] in ("supported", "refused", "untested")
    if not FULL and os.environ.get("ERA_REGISTRY_WRITING") != "1":
        rows = matrix_statuses()
        assert rows.get(model_type) == result["status"], (
            f"docs/support.md's registry matrix says {rows.get(model_type)!r} for {model_type}, "
            f"this run {result}: "
            "rerun scripts/registry_matrix.py --write"
        )


def failure_of(error: BaseException) -> str:
    """Which side failed: the eager reference (this check's own tool) or the compiled model."""
    files = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
    side = (
        "the eager reference fails"
        if any(f.endswith("era_compile/reference.py") for f in files)
        else "the check fails"
        if isinstance(error, AssertionError)
        else "the compiled model fails"
    )
    return f"{side}: {type(error).__name__}: {_short(error)}"


def _record(model_type: str, result: dict) -> None:
    folder = os.environ.get("ERA_REGISTRY_OUT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{model_type}.json").write_text(json.dumps({"model_type": model_type, **result}))


def matrix_statuses() -> dict:
    """model type -> status, from the registry matrix in docs/support.md."""
    text = SUPPORT_DOC.read_text()
    block = text.split("<!-- registry-matrix:begin -->", 1)[-1].split("<!-- registry-matrix:end -->", 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("*")
    return rows


def test_registry_matrix_lists_every_registered_type():
    """A new transformers release that registers a model type must show up as a row, not a gap."""
    if os.environ.get("ERA_REGISTRY_WRITING") == "1":
        pytest.skip("the matrix is being written")
    missing = [t for t in ALL_TYPES if t not in matrix_statuses()]
    assert not missing, (
        f"docs/support.md's registry matrix has no row for {missing}: rerun scripts/registry_matrix.py --write"
    )
