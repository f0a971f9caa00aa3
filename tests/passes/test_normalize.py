"""normalize: every spelling of a family becomes one, and the graph computes what it did."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from era_compile import ERAConfig
from era_compile.passes.graph_pass import PassContext
from era_compile.passes.kinds import GraphKind
from era_compile.passes.manager import copy_graph
from era_compile.passes.normalize import normalize
from toys import ToyVLM, capture, op_counts, prompt


def _normalized(fn, *args):
    gm, example_inputs = capture(fn, *args)
    work = copy_graph(gm)
    result = normalize(work, PassContext(ERAConfig(), GraphKind.TEXT, 0, tuple(example_inputs)))
    work.graph.lint()
    work.recompile()
    with torch.no_grad():
        assert torch.equal(work(*example_inputs)[0], gm(*example_inputs)[0])  # the same computation
    return gm, work, result


def test_view_spellings_become_one_method_call_with_a_size_tuple():
    def f(x):
        a = x.view(2, 3, 4)
        b = torch.reshape(x, (4, 6))
        c = x.reshape(24)
        d = x[:, None].expand(2, 2, 12)
        e = torch.Tensor.view(x, [6, 4])
        return (a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + x.view(torch.int32).float().sum(),)

    gm, work, result = _normalized(f, torch.randn(2, 12))
    before, after = op_counts(gm), op_counts(work)
    assert before["reshape"] == 1 and after["reshape"] == 0  # torch.reshape -> x.reshape(sizes)
    assert after["method:view"] + after["method:reshape"] + after["method:expand"] == 6
    for node in work.graph.nodes:
        if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
            dtype_view = isinstance(node.args[1], torch.dtype)
            assert dtype_view or (len(node.args) == 2 and isinstance(node.args[1], tuple) and not node.kwargs)
    assert result.counts["views"] >= 4 and result.changed


def test_merge_spellings_become_masked_scatter_and_an_assignment_is_folded():
    torch.manual_seed(0)
    ids, features = prompt()
    for merge in ("function", "setitem"):
        gm, work, result = _normalized(ToyVLM(merge=merge).eval(), ids, features)
        assert op_counts(work)["method:masked_scatter"] == 1 and result.counts["merges"] == 1
        assert not any(n.target is operator.setitem for n in work.graph.nodes)
        assert op_counts(gm)["method:masked_scatter"] == 0


def test_assignment_into_an_input_is_left_alone():
    def f(embeds, mask, features):
        embeds[mask] = features  # the caller sees this write: folding it would drop it
        return (embeds * 2,)

    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    gm, example_inputs = capture(f, torch.randn(1, 6, 4), mask, torch.randn(3, 4))
    work = copy_graph(gm)
    result = normalize(work, PassContext(ERAConfig(), GraphKind.TEXT, 0, tuple(example_inputs)))
    assert result.counts["merges"] == 0 and op_counts(work)["method:masked_scatter"] == 0


def test_sdpa_gets_keywords_and_cat_a_non_negative_dim():
    def f(q, k, v):
        kv = torch.concat([k, v], -2)
        return (torch._C._nn.scaled_dot_product_attention(q, kv, kv, None, 0.0, True),)

    q = torch.randn(1, 2, 4, 8)
    gm, work, result = _normalized(f, q, q.clone(), q.clone())
    sdpa = next(n for n in work.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert len(sdpa.args) == 3 and set(sdpa.kwargs) == {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
    assert sdpa.kwargs["is_causal"] is True
    cat = next(n for n in work.graph.nodes if n.target is torch.cat)
    assert cat.kwargs == {"dim": 2} and len(cat.args) == 1
    assert result.counts["attention"] == 1 and result.counts["cat"] == 1


def test_canonical_graph_is_left_unchanged():
    def f(x):
        return (torch.cat([x.view((2, 6)), x.view((2, 6))], dim=1),)

    gm, example_inputs = capture(f, torch.randn(12))
    work = copy_graph(gm)
    normalize(work, PassContext(ERAConfig(), GraphKind.TEXT, 0, tuple(example_inputs)))
    result = normalize(work, PassContext(ERAConfig(), GraphKind.TEXT, 0, tuple(example_inputs)))
    assert not result.changed  # idempotent: a second run finds nothing to fold
