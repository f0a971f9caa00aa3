"""The backend's contract: never a silent no-op, clear errors, reports, registration, dumps."""

from __future__ import annotations

import logging
import weakref

import pytest
import torch

from conftest import build, compiled_forward, raised_chain
from era_compile import EraCompileError, ERAConfig, make_era_backend


class MergeWithoutDecoder(torch.nn.Module):
    """A masked_scatter merge with no attention after it: nothing a decoder pass can find."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, embeds, mask, features):
        return self.proj(embeds.masked_scatter(mask, features))


def _merge_inputs():
    mask = torch.zeros(1, 10, 1, dtype=torch.bool)
    mask[:, 2:6] = True
    return torch.randn(1, 10, 8), mask, torch.randn(4, 8)


class MergeByAssignment(torch.nn.Module):
    """Image features written with ``embeds[mask] = features`` into the caller's tensor: a merge the
    passes cannot rewrite (normalize folds an assignment into a tensor the graph made, not this one)."""

    def forward(self, embeds, mask, features):
        embeds[mask] = features
        return embeds * 2


def test_merge_by_masked_assignment_is_named():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, 2:6] = True
    args = (torch.randn(1, 10, 8), mask, torch.randn(4, 8))
    expected = MergeByAssignment()(args[0].clone(), mask, args[2])
    with pytest.raises(Exception, match=r"masked assignment \(embeds\[mask\] = features\), not masked_scatter"):
        torch.compile(MergeByAssignment(), backend=make_era_backend(ERAConfig(compiler="eager", strict=True)))(
            args[0].clone(), *args[1:]
        )
    torch._dynamo.reset()
    backend = make_era_backend(ERAConfig(compiler="eager"))
    with pytest.warns(RuntimeWarning, match="not masked_scatter"):
        out = torch.compile(MergeByAssignment(), backend=backend)(args[0].clone(), *args[1:])
    assert torch.equal(out, expected) and not backend.report.pruned


def test_text_only_prompt_passes_through_and_says_so():
    model, _ = build("llava")
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out, report = compiled_forward(model, {"input_ids": ids}, ERAConfig(compiler="eager", strict=True))
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert not report.pruned
    assert report.skipped and all("no image merge" in s for s in report.skipped)
    assert "no graph was pruned" in str(report)


def test_strict_raises_on_a_merge_without_decoder_layers():
    model = MergeWithoutDecoder()
    backend = make_era_backend(ERAConfig(compiler="eager", strict=True))
    with pytest.raises(Exception, match="no decoder layer after the image merge"):
        torch.compile(model, backend=backend)(*_merge_inputs())


def test_non_strict_warns_reports_and_runs_unpruned(caplog):
    model = MergeWithoutDecoder()
    args = _merge_inputs()
    backend = make_era_backend(ERAConfig(compiler="eager"))
    with (
        caplog.at_level(logging.DEBUG, logger="era_compile"),
        pytest.warns(RuntimeWarning, match="pruning did not happen") as told,
    ):
        out = torch.compile(model, backend=backend)(*args)
    assert torch.allclose(out, model(*args))
    assert not backend.report.pruned
    assert any("pruning did not happen" in s for s in backend.report.skipped)
    # told once: a warning, not also a log line (the report keeps it)
    assert len([w for w in told if "pruning did not happen" in str(w.message)]) == 1
    assert not any("pruning did not happen" in r.getMessage() for r in caplog.records)


def test_layer_beyond_the_model_is_reported():
    model, inputs = build("llava")
    with pytest.raises(Exception, match="ERAConfig.layer=9 but the language model has 4 decoder layers"):
        compiled_forward(model, inputs, ERAConfig(layer=9, compiler="eager", strict=True))


def test_dump_writes_graphs_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv("ERA_COMPILE_DUMP", str(tmp_path))
    model, inputs = build("llava")
    compiled_forward(model, inputs, ERAConfig(layer=1, compiler="eager", strict=True))
    compiled = sorted(tmp_path.glob("*_graph*/compiled.py"))  # what the inner compiler received
    assert len(compiled) == 1 and len(list(tmp_path.glob("*_graph*/dynamo.py"))) >= 2  # every graph, as handed over
    assert (compiled[0].parent / "04_prune_after.py").exists()  # and each pass that changed it, numbered
    text = compiled[0].read_text()
    assert "era.select" in text and "era.recycle" in text and "era.biased_attention" in text


@pytest.mark.parametrize(
    "field, value",
    [
        ("keep_ratio", 0.0),
        ("keep_ratio", 1.5),
        ("keep_tokens", 0),
        ("layer", -1),
        ("layer", 1.5),
        ("strategy", "nope"),
        ("recycle", "yes"),
        ("rectify", 1),
        ("dep_lambda", -1.0),
        ("dep_beta", 2.0),
        ("weight_norm", "sum"),
        ("attention", "cuda"),
        ("compiler", "tvm"),
        ("strict", None),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ERAConfig\.{field}"):
        ERAConfig(**{field: value})


def test_config_budget_and_key():
    assert ERAConfig().keep_ratio == 0.25
    with pytest.raises(ValueError, match="not both"):
        ERAConfig(keep_ratio=0.5, keep_tokens=8)
    assert ERAConfig(keep_tokens=8).kept(36) == 8 and ERAConfig(keep_tokens=80).kept(36) == 36
    assert ERAConfig(keep_ratio=0.11).kept(576) == 63 and ERAConfig(keep_ratio=1e-6).kept(576) == 1
    assert ERAConfig().cache_key() == ERAConfig().cache_key() != ERAConfig(layer=3).cache_key()
    with pytest.raises(TypeError):
        make_era_backend({"layer": 2})


def test_strict_error_type_is_exported():
    model, inputs = build("llava")
    with pytest.raises(Exception) as info:
        compiled_forward(model, inputs, ERAConfig(layer=9, compiler="eager", strict=True))
    assert EraCompileError in raised_chain(info.value)


def test_inductor_freezing_constants_do_not_stop_the_rewrite():
    """With Inductor freezing on, Dynamo hands module buffers over as real-tensor constants
    (get_attr); the passes' shape checks must take them (they once refused the graph)."""
    import torch._inductor.config as inductor_config

    from era_compile.reference import EagerReference

    model, inputs = build("llava")
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    with inductor_config.patch(freezing=True):
        out, report = compiled_forward(model, inputs, config)
    assert report.pruned
    with torch.no_grad():
        expected = EagerReference(model, config)(**inputs)
    assert (out.logits - expected.logits).abs().max().item() <= 1e-4


def test_hitting_the_recompile_limit_is_told():
    """Past Dynamo's recompile limit a function runs eagerly for good (so unpruned) and Dynamo only
    logs it: the backend turns that into a warning and a report note as it happens; strict mode
    raises into the call that hit it. Neither changes Dynamo's settings, and the listener on Dynamo's
    logger goes with the last compiled model."""
    import gc

    from era_compile.recompiles import _listener

    dynamo_log, earlier = logging.getLogger("torch._dynamo.convert_frame"), set(_listener.watches)
    settings = torch._dynamo.config.get_config_copy()
    with torch._dynamo.config.patch(recompile_limit=2):
        backend = make_era_backend(ERAConfig(compiler="eager"))
        scaled = torch.compile(lambda x, n: x * n, backend=backend, dynamic=False)
        with pytest.warns(RuntimeWarning, match=r"recompile limit \(2\) for '<lambda>'"):
            for n in range(4):  # an int argument specialises: one graph per value
                scaled(torch.ones(2), n)
        assert any("recompile limit" in note for note in backend.report.notes)
        assert _listener in dynamo_log.filters
        ours = [weakref.ref(watch) for watch in set(_listener.watches) - earlier]
        assert len(ours) == 1
        del scaled, earlier
        torch._dynamo.reset()
        gc.collect()
        assert ours[0]() is None  # its model gone, so is its watch
        assert (_listener in dynamo_log.filters) == (_listener.alive > 0)  # the listener goes with the last
        strict = make_era_backend(ERAConfig(compiler="eager", strict=True))
        scaled = torch.compile(lambda x, n: x * n + 1, backend=strict, dynamic=False)
        with pytest.raises(EraCompileError, match="recompile limit"):
            for n in range(4):
                scaled(torch.ones(2), n)
        # a function two live models traced (as every HF model's forward decorator): the line does not say
        # whose call hit the limit, so the strict one is told without failing the other's call
        torch._dynamo.reset()

        def shared(x, n):
            return x * n - 1

        strict_model = torch.compile(shared, backend=make_era_backend(ERAConfig(compiler="eager", strict=True)))
        strict_model(torch.ones(2), 0)
        other = make_era_backend(ERAConfig(compiler="eager"))
        other_model = torch.compile(shared, backend=other, dynamic=False)
        with pytest.warns(RuntimeWarning, match="recompile limit"):
            for n in range(1, 5):
                other_model(torch.ones(2), n)
        assert any("recompile limit" in note for note in other.report.notes)
    assert torch._dynamo.config.get_config_copy() == settings


def test_a_new_budget_compiles_nothing_and_is_the_references():
    """The keep budget is an input of the compiled graphs: ``backend.budget`` changes it for the
    block, no graph compiles, and each budget's output is the eager reference's for that budget."""
    from era_compile.reference import EagerReference

    model, inputs = build("llava")
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    backend = make_era_backend(config)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(**inputs)
        graphs = backend.report.graphs
        for budget in (dict(keep_ratio=0.5), dict(keep_tokens=3)):
            with backend.budget(**budget):
                out = compiled(**inputs)
            expected = EagerReference(model, config.replace(**{"keep_ratio": None, **budget}))(**inputs)
            assert (out.logits - expected.logits).abs().max().item() <= 1e-4
        back = compiled(**inputs)  # the config's budget again after the block
    assert backend.report.graphs == graphs
    kept = [p.kept for p in backend.report.pruning]
    T = backend.report.pruning[0].visual_tokens
    assert kept == [config.kept(T), round(0.5 * T), 3]
    assert back.logits.shape[1] == backend.report.pruning[0].seq_len_after  # the config's budget again
    with pytest.raises(ValueError, match="keep_ratio"):
        with backend.budget(keep_ratio=1.5):
            pass
    with pytest.raises(ValueError, match="one of keep_ratio or keep_tokens"):
        with backend.budget():
            pass
