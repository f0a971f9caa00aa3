"""kinds: the one classifier, on the toy's graphs of every kind."""

from __future__ import annotations

import torch
from toys import ToyVLM, capture, past_cache, prompt

from era_compile import ERAConfig
from era_compile.passes.kinds import GraphKind, classify
from era_compile.passes.manager import prepare
from era_compile.passes.records import CarriedVisual


def _kind(fn, *args, carried=None):
    gm, example_inputs = capture(fn, *args)
    prepared = prepare(gm, ERAConfig(), 0, example_inputs)
    return classify(prepared.gm, carried, example_inputs)


def test_each_kind():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt()
    assert _kind(model, ids, features) is GraphKind.PREFILL
    assert _kind(lambda i, f: (model.embed(i).masked_scatter((i == 63)[..., None], f),), ids, features) \
        is GraphKind.HANDOFF
    assert _kind(model, ids[:, :1], None, past_cache()) is GraphKind.DECODE
    assert _kind(model, ids) is GraphKind.TEXT
    carried = CarriedVisual(0, torch.zeros(1, 16, dtype=torch.bool))
    assert _kind(lambda e: (model.layers[0](e, torch.ones(1))[0],), torch.randn(1, 16, 32), carried=carried) \
        is GraphKind.CARRIED


def test_an_assignment_merge_it_cannot_fold_is_still_an_image_merge():
    """Never silent: the merge is classified as one, so ``span`` names why it cannot prune it."""
    def f(embeds, mask, features):
        embeds[mask] = features
        return embeds * 2,

    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    assert _kind(f, torch.randn(1, 6, 4), mask, torch.randn(3, 4)) in (GraphKind.PREFILL, GraphKind.HANDOFF)


def test_kinds_that_may_receive_merged_embeddings():
    assert {k for k in GraphKind if k.may_receive_embeddings} == {GraphKind.DECODE, GraphKind.TEXT}
    assert {k for k in GraphKind if k.has_image} == {GraphKind.PREFILL, GraphKind.HANDOFF, GraphKind.CARRIED}
