"""prune: era::select and era::recycle at layer K, every later length follows the pruned one."""

from __future__ import annotations

import pytest
import torch
from toys import PassRecorder, ToyVLM, prompt

from era_compile import ERAConfig
from era_compile.passes.fx_utils import reachable_from, tensor_meta
from era_compile.passes.records import PruneSite


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_inserts_select_and_recycle_and_gathers_what_crosses_the_cut(layer):
    torch.manual_seed(0)
    ids, features = prompt(visual=8)
    config = ERAConfig(layer=layer, keep_tokens=3, rectify=False)
    rec = PassRecorder(ToyVLM().eval(), ids, features, config=config, until="prune")
    site = rec.record(PruneSite)
    N, n_after = ids.shape[1], ids.shape[1] - 8 + 3
    assert (site.layer, site.visual_tokens, site.kept, site.seq_len_before, site.seq_len_after) == \
        (layer, 8, 3, N, n_after)
    assert rec.added("era.select") == 1 and rec.added("era.recycle") == 1
    assert rec.added("gather") == 1  # the cos table every later layer reads, gathered once
    counts = rec.pass_result("prune").counts
    assert counts["gathered_tensors"] == 1 and counts["rewritten_shapes"] > 0
    for node in reachable_from([site.hidden_kept], through_sizes=False):  # no stale length after the cut
        t = tensor_meta(node)
        if t is not None and node.op != "output":
            assert N not in tuple(t.shape), f"{node.name} still has length {N}"
    if layer == 0:  # layer 0's q/k on the unpruned input: a copy of their computation feeds select
        assert rec.added("method:view") >= 2


def test_pruned_graph_runs_and_keeps_the_text():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt(visual=8)
    config = ERAConfig(layer=1, keep_tokens=8, rectify=False, recycle=False)  # keep all: nothing changes
    rec = PassRecorder(model, ids, features, config=config)
    with torch.no_grad():
        out = rec.result.gm(*rec.example_inputs)
        expected = rec.gm(*rec.example_inputs)
    assert torch.allclose(out[0], expected[0], atol=1e-5)
