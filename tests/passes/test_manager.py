"""The pass manager: contracts checked, timing, provenance, numbered dumps, fake checks, DCE tail."""

from __future__ import annotations

import pytest
import torch

from era_compile import ERAConfig
from era_compile.passes import manager
from era_compile.passes.graph_pass import MissingRecord, PassError, PassResult, graph_pass
from era_compile.passes.kinds import GraphKind
from era_compile.passes.layers import find_decoder_layers
from era_compile.passes.records import DecoderLayers, PruneSite, VisualSpan
from era_compile.passes.rewrite import insert_call
from toys import PassRecorder, ToyVLM, capture, prompt


def _run_text_graph_through(monkeypatch, *passes):
    """The toy's text-only graph through a pipeline of just ``passes``."""
    monkeypatch.setitem(manager.PIPELINES, GraphKind.TEXT, passes)
    torch.manual_seed(0)
    gm, example_inputs = capture(ToyVLM().eval(), prompt()[0])
    return manager.run_passes(manager.prepare(gm, ERAConfig(), 0, example_inputs), ERAConfig(), example_inputs)


def test_a_misdeclared_pipeline_is_refused_naming_the_missing_record():
    with pytest.raises(TypeError, match=r"pass 'layers' requires \['VisualSpan'\]"):
        manager.check_pipeline([find_decoder_layers])


def test_a_missing_record_at_run_time_is_named(monkeypatch):
    with pytest.raises(MissingRecord, match=r"pass 'layers' needs \['VisualSpan'\]"):
        _run_text_graph_through(monkeypatch, find_decoder_layers)


def test_a_pass_must_return_what_it_declares(monkeypatch):
    @graph_pass("liar", provides=DecoderLayers)
    def liar(gm, ctx):
        return PassResult(record=VisualSpan(None, None, 1, 1, 1))

    with pytest.raises(TypeError, match="pass 'liar' returned VisualSpan, declared DecoderLayers"):
        _run_text_graph_through(monkeypatch, liar)


def test_a_rewrite_whose_shapes_do_not_check_fails_naming_the_pass(monkeypatch):
    @graph_pass("breaks_shapes")
    def breaks_shapes(gm, ctx):
        out = gm.graph.output_node()
        logits = out.args[0][0]
        with gm.graph.inserting_before(out):
            bad = insert_call(gm.graph, torch.matmul, (logits, logits), stem="bad")  # [1,N,V] @ [1,N,V]
        out.args = ((bad, *out.args[0][1:]),)
        return PassResult(changed=True)

    with pytest.raises(PassError, match="after pass 'breaks_shapes' the graph no longer type-checks"):
        _run_text_graph_through(monkeypatch, breaks_shapes)


def test_dead_nodes_go_in_the_tail(monkeypatch):
    @graph_pass("leaves_a_dead_node")
    def leaves_a_dead_node(gm, ctx):
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(first):
            insert_call(gm.graph, torch.neg, (first,), stem="dead")
        return PassResult(changed=True)

    result = _run_text_graph_through(monkeypatch, leaves_a_dead_node)
    assert not any(n.name.startswith("era_dead") for n in result.gm.graph.nodes)
    assert [t.name for t in result.timings] == ["normalize", "classify", "leaves_a_dead_node", "dce"]


def test_timing_and_provenance_of_every_pass():
    torch.manual_seed(0)
    rec = PassRecorder(ToyVLM().eval(), *prompt())
    names = [t.name for t in rec.result.timings]
    assert names == ["normalize", "classify", "span", "layers", "kvcache", "prune", "attention", "publish", "dce"]
    counts = rec.result.counts()
    assert all(counts[name]["ms"] >= 0 for name in names)
    assert counts["prune"]["ms"] > 0
    by_pass = {}
    for node in rec.result.gm.graph.nodes:
        by_pass.setdefault(node.meta.get("era_pass"), set()).add(node.name)
    assert rec.record(PruneSite).keep_index.name in by_pass["prune"]
    assert any(name.startswith("era_biased_attention") for name in by_pass["attention"])
    assert any(name.startswith("era_select") for name in by_pass["prune"])


def test_numbered_dumps_of_each_pass_that_changed_the_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("ERA_COMPILE_DUMP", str(tmp_path))
    torch.manual_seed(0)
    config = ERAConfig(layer=1, keep_tokens=3)
    PassRecorder(ToyVLM().eval(), *prompt(), config=config)
    (folder,) = tmp_path.iterdir()
    assert folder.name == f"{config.cache_key()}_graph0"
    names = sorted(p.name for p in folder.iterdir())
    for step, name in [(0, "normalize"), (1, "span"), (4, "prune"), (5, "attention"), (6, "publish")]:
        assert f"{step:02d}_{name}_before.py" in names and f"{step:02d}_{name}_after.py" in names
    assert "02_layers_before.py" not in names  # layers changes nothing
    assert "07_dce_after.py" in names
    after_prune = (folder / "04_prune_after.py").read_text()
    assert after_prune.startswith("# inserted by") and "# inserted by prune: " in after_prune
    assert "era.select" in after_prune


def test_incremental_fake_update_agrees_with_a_full_propagation():
    """After every pass only the nodes it touched (and what their new values reach) are re-run on
    fake tensors; the result must be what propagating the whole graph afresh gives."""
    torch.manual_seed(0)
    rec = PassRecorder(ToyVLM().eval(), *prompt(), config=ERAConfig(layer=1, keep_tokens=3))
    gm = rec.result.gm

    def shapes():
        return {
            n.name: tuple(n.meta["val"].shape) for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
        }

    incremental = shapes()
    manager.propagate_fake(gm, rec.result.example_inputs)
    assert shapes() == incremental and len(incremental) > 50
