"""kinds: the one classifier, on the toy's graphs of every kind."""

from __future__ import annotations

import torch

from era_compile import ERAConfig
from era_compile.passes.kinds import GraphKind, classify, where_merges
from era_compile.passes.manager import prepare
from era_compile.passes.records import CarriedVisual
from toys import IMAGE, ToyVLM, capture, past_cache, prompt


def _kind(fn, *args, carried=None):
    gm, example_inputs = capture(fn, *args)
    prepared = prepare(gm, ERAConfig(), 0, example_inputs)
    return classify(prepared.gm, carried, example_inputs)


def test_each_kind():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt()
    assert _kind(model, ids, features) is GraphKind.PREFILL
    assert (
        _kind(lambda i, f: (model.embed(i).masked_scatter((i == 63)[..., None], f),), ids, features)
        is GraphKind.HANDOFF
    )
    assert _kind(model, ids[:, :1], None, past_cache()) is GraphKind.DECODE
    assert _kind(model, ids) is GraphKind.TEXT
    carried = CarriedVisual(0, torch.zeros(1, 16, dtype=torch.bool))
    assert (
        _kind(lambda e: (model.layers[0](e, torch.ones(1))[0],), torch.randn(1, 16, 32), carried=carried)
        is GraphKind.CARRIED
    )


def test_an_assignment_merge_it_cannot_fold_is_still_an_image_merge():
    """Never silent: the merge is classified as one, so ``span`` names why it cannot prune it."""

    def f(embeds, mask, features):
        embeds[mask] = features
        return (embeds * 2,)

    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    assert _kind(f, torch.randn(1, 6, 4), mask, torch.randn(3, 4)) in (GraphKind.PREFILL, GraphKind.HANDOFF)


def test_kinds_that_may_receive_merged_embeddings():
    assert {k for k in GraphKind if k.may_receive_embeddings} == {GraphKind.DECODE, GraphKind.TEXT}
    assert {k for k in GraphKind if k.has_image} == {
        GraphKind.PREFILL,
        GraphKind.HANDOFF,
        GraphKind.CARRIED,
        GraphKind.LAYER_PRUNE,
    }


def test_a_where_merge_is_told_from_other_selects():
    """``where(is_image, features, embeds)`` merges; a select between two values of the text's own
    stream, or against zeros or one constant row (Gemma 4 blanks its placeholders so), does not."""
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt()
    rows = features.flatten(0, -2)  # [T, D]

    def merges(fn, *args):
        gm, example_inputs = capture(fn, *args)
        prepared = prepare(gm, ERAConfig(), 0, example_inputs)
        return sorted(where_merges(prepared.gm, example_inputs).values())

    image = lambda i: (i == IMAGE)[..., None]
    slot = lambda i: ((i == IMAGE).long().cumsum(-1) - 1).clamp(min=0)  # the row each position takes
    assert merges(lambda i, f: (torch.where(image(i), f[slot(i)], model.embed(i)),), ids, rows) == [False]
    assert merges(lambda i, f: (torch.where(~image(i), model.embed(i), f[slot(i)]),), ids, rows) == [True]
    assert merges(lambda i, f: (model.embed(i).where(~image(i), f[slot(i)]),), ids, rows) == [
        True
    ]  # the method spelling
    assert merges(lambda i, f: (torch.where(image(i), model.embed(i) * 2, model.embed(i)),), ids, rows) == []
    assert merges(lambda i, f: (torch.where(image(i), f[:1], model.embed(i)),), ids, rows) == []
    assert (
        merges(lambda i, f: (torch.where(image(i), torch.zeros_like(model.embed(i)), model.embed(i)),), ids, rows) == []
    )
    assert (
        merges(lambda i, f: (torch.where(image(i), torch.zeros(*i.shape, f.shape[-1]), model.embed(i)),), ids, rows)
        == []
    )  # made from sizes alone: no data to merge
