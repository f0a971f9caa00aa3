"""Shared helpers: tiny zoo models, compile-and-run, a clean Dynamo state per test."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():  # the Triton kernel runs on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # workers share the cores instead of oversubscribing them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from era_compile import ERAConfig, last_report, make_era_backend, zoo  # noqa: E402
from era_compile.compact_kv import stored_rows  # noqa: E402
from era_compile.compat import output_cache  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_forward(model, inputs, config: ERAConfig):
    """Compile ``model`` with the era backend of ``config``, run once; (outputs, report)."""
    backend = make_era_backend(config)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs)
    return out, backend.report


def build(name="llava", **kwargs):
    return zoo.build(name, **kwargs)


def greedy(max_new_tokens: int) -> dict:
    """``generate`` arguments of a greedy run that returns its sequences and every step's logits."""
    return dict(max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)


def compiled_generate(model, inputs, config: ERAConfig, generate_kwargs: dict, **compile_options):
    """``model.generate`` with the model compiled by the era backend of ``config``; the model is left
    uncompiled after, for what runs next. (generated, backend)"""
    backend = make_era_backend(config)
    model.compile(backend=backend, **compile_options)
    try:
        with torch.no_grad():
            return model.generate(**inputs, **generate_kwargs), backend
    finally:
        model._compiled_call_impl = None


def logits_difference(generated, expected) -> float:
    """The largest difference of two greedy runs' logits, over every step."""
    return max((a - b).abs().max().item() for a, b in zip(generated.logits, expected.logits, strict=True))


def generate_matches_reference(
    model, inputs, config: ERAConfig, *, max_new_tokens: int = 8, tol: float = 1e-4, **compile_options
):
    """Greedy generate with the model compiled by the era backend equals the eager reference's,
    token for token and logit for logit (within ``tol``); returns the backend for its report."""
    from era_compile.reference import EagerReference

    expected = EagerReference(model, config).generate(**inputs, **greedy(max_new_tokens))
    generated, backend = compiled_generate(model, inputs, config, greedy(max_new_tokens), **compile_options)
    assert torch.equal(generated.sequences, expected.sequences)
    assert logits_difference(generated, expected) <= tol
    return backend


@dataclass(frozen=True)
class GraphCall:
    """One call of a graph the era backend compiled: the era ops the graph holds (``recycle``: a
    prune; ``kept_tokens``: a split decoder's layer after K), the FLOPs the call ran and the query
    shape of each ``era::biased_attention`` in it."""

    era_ops: frozenset[str]
    flops: int
    attention_queries: tuple[tuple[int, ...], ...]


class _AttentionQueries(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.era.biased_attention.default:
            self.shapes.append(tuple((args[0] if args else kwargs["q"]).shape))
        return func(*args, **kwargs)


@pytest.fixture
def graph_calls(monkeypatch) -> list[GraphCall]:
    """Every call of a graph the era backend compiles while the test runs, in call order, counted
    as it runs (``GraphCall``). A dispatch mode cannot sit around a compiled model (Dynamo runs the
    frames eagerly under one), so each compiled graph runs inside FlopCounterMode instead, with
    ``era::biased_attention`` counted as the attention it is."""
    from torch.utils.flop_counter import FlopCounterMode

    import era_compile.backend as backend_module
    from era_compile.bench import register_biased_attention_flops, register_cpu_sdpa_flops

    register_cpu_sdpa_flops()
    register_biased_attention_flops()
    calls: list[GraphCall] = []
    real = backend_module.inner_compile

    def compile_(gm, example_inputs, compiler):
        compiled = real(gm, example_inputs, compiler)
        targets = (n.target for n in gm.graph.nodes if n.op == "call_function")
        ops = frozenset(t._opname for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace == "era")

        def counted(*args):
            with FlopCounterMode(display=False) as flops, _AttentionQueries() as queries:
                out = compiled(*args)
            calls.append(GraphCall(ops, flops.get_total_flops(), tuple(queries.shapes)))
            return out

        return counted

    monkeypatch.setattr(backend_module, "inner_compile", compile_)
    return calls


def assert_cache_rows(model, inputs, generated, report, layer: int) -> None:
    """The compact cache after the prefill alone (a one-token generate through the same compiled
    model) and after ``generated``'s decode steps: n' (+ t) rows in the pruned layers, N (+ t) before."""
    N, n_after = inputs["input_ids"].shape[1], report.pruning[0].seq_len_after
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        prefilled = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    for out, t in ((prefilled, 0), (generated, generated.sequences.shape[1] - N - 1)):
        assert [stored_rows(c.keys) for c in output_cache(out).layers] == [N + t] * layer + [n_after + t] * (
            layers - layer
        )
    assert n_after < N and report.pruning[-1].seq_len_after == n_after


# ---------------------------------------------------------------------------- support matrix
# When this session ran the whole matrix (tests/test_architectures.py::test_support_matrix),
# the table in docs/support.md must be what scripts/support_matrix.py renders from these outcomes.


def _support_matrix_module():
    path = Path(__file__).resolve().parent.parent / "scripts" / "support_matrix.py"
    spec = importlib.util.spec_from_file_location("era_support_matrix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    if os.environ.get("ERA_SUPPORT_MATRIX_WRITING"):  # the script is rewriting docs/support.md
        return
    module = _support_matrix_module()
    config._era_matrix = (module, module.MatrixCollector())
    config.pluginmanager.register(config._era_matrix[1], "era_support_matrix")


def pytest_sessionfinish(session, exitstatus):
    module, collector = getattr(session.config, "_era_matrix", (None, None))
    if collector is None or not collector.complete():
        return
    if module.doc_table() != module.render(collector.cells):
        session.config.get_terminal_writer().line(
            "\nThe support matrix in docs/support.md differs from this run's outcomes: run "
            "`.venv/bin/python scripts/support_matrix.py --write`",
            red=True,
        )
        session.exitstatus = 1


__all__ = [
    "compiled_forward",
    "build",
    "compiled_generate",
    "generate_matches_reference",
    "greedy",
    "last_report",
    "logits_difference",
]


def raised_chain(error: BaseException) -> list:
    """The exception types of ``error`` and every cause or context behind it (Dynamo wraps ours)."""
    chain = []
    while error is not None:
        chain.append(type(error))
        error = error.__cause__ or error.__context__
    return chain
