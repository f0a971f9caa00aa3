"""The whole prefill pipeline on LLaVA captured as one graph (vision tower, merge and decoder
together: the hardest case for filtering), node by node."""

from __future__ import annotations

import pytest
import torch

from conftest import build
from era_compile import ERAConfig
from era_compile.passes.fx_utils import (
    is_masked_scatter,
    is_sdpa,
    module_stack_paths,
    reachable_from,
    same_size,
    tensor_meta,
)
from era_compile.passes.kinds import GraphKind
from era_compile.passes.manager import prepare, run_passes
from era_compile.passes.records import DecoderLayers, PruneSite, RectifiedAttention, VisualSpan


def _capture_single_graph(model, inputs):
    """LLaVA as one graph (vision tower, merge and decoder together): the hardest case for filtering."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        model(**inputs)  # warm: transformers installs its hooks lazily on the first call
        torch.compile(model, backend=backend)(**inputs)
    return next((gm, ex) for gm, ex in graphs if any(is_masked_scatter(n) for n in gm.graph.nodes))


def _is_vision(node):
    return any("vision" in p for p in module_stack_paths(node))


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.mark.parametrize("layer", [0, 2])
def test_pipeline_node_counts(layer):
    model, inputs = build("llava")
    gm, example_inputs = _capture_single_graph(model, inputs)
    n_layers = model.config.text_config.num_hidden_layers
    sdpa = [n for n in gm.graph.nodes if is_sdpa(n)]
    vision = [n.name for n in sdpa if _is_vision(n)]
    assert len(vision) == model.config.vision_config.num_hidden_layers and len(sdpa) == len(vision) + n_layers

    config = ERAConfig(layer=layer, keep_ratio=0.25)
    prepared = prepare(gm, config, 0, example_inputs)
    assert prepared.kind is GraphKind.PREFILL
    pipeline = run_passes(prepared, config, example_inputs)
    work, results = pipeline.gm, dict(pipeline.results)

    after = [n for n in work.graph.nodes if is_sdpa(n)]
    vision_after = [n.name for n in after if _is_vision(n)]
    # the vision tower is untouched (its last layer is dead code: LLaVA reads hidden_states[-2])
    assert set(vision_after) <= set(vision) and len(vision_after) >= len(vision) - 1
    assert len(after) == len(vision_after) + layer
    assert _count(work, torch.ops.era.biased_attention.default) == n_layers - layer
    assert _count(work, torch.ops.era.select.default) == 1
    assert _count(work, torch.ops.era.recycle.default) == 1
    assert results["attention"].counts["attention_rewrites"] == n_layers - layer
    assert results["prune"].counts["rewritten_shapes"] > 0 and results["prune"].counts["gathered_tensors"] > 0
    assert results["layers"].counts["decoder_layers"] == n_layers

    # every node carries fake metadata, and no stale length is left after the cut
    N = pipeline.record(VisualSpan).seq_len
    for node in work.graph.nodes:
        if node.name.startswith("era_") or isinstance(node.meta.get("example_value"), torch.Tensor):
            assert isinstance(node.meta.get("val"), (torch.Tensor, tuple, list, int, torch.SymInt)), node.name
    site = pipeline.record(PruneSite)
    downstream = reachable_from([site.hidden_kept], through_sizes=False)  # every node that depends on the cut
    rectified = [call for _, call in pipeline.record(RectifiedAttention).calls]
    assert len(pipeline.record(DecoderLayers)) == n_layers and set(rectified) <= downstream
    for node in downstream:
        t = tensor_meta(node)
        if node.graph is work.graph and t is not None:
            assert not any(same_size(d, N) for d in t.shape), f"{node.name} still has length {N}: {tuple(t.shape)}"


def test_single_graph_runs_and_prunes():
    """The single-graph capture (vision tower inside) also compiles and matches the reference."""
    from conftest import compiled_forward
    from era_compile.reference import EagerReference

    model, inputs = build("llava")
    config = ERAConfig(layer=1, compiler="eager", strict=True)
    expected = EagerReference(model, config)(**inputs).logits
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, report = compiled_forward(model, inputs, config)
    assert report.pruned and report.graphs == 1
    assert (out.logits - expected).abs().max().item() <= 1e-4
