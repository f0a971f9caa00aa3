"""span: the image merge and a [B, N] visual mask (how many visual tokens each sample holds is
the pruning ops' to count, on every call)."""

from __future__ import annotations

import pytest
import torch

from era_compile import ERAConfig, make_era_backend
from era_compile.passes.fx_utils import tensor_meta
from era_compile.passes.graph_pass import PassError
from era_compile.passes.kinds import scatter_merges
from era_compile.passes.manager import prepare, run_passes
from era_compile.passes.records import CarriedVisual, VisualMaskInput, VisualSpan
from toys import IMAGE, PassRecorder, ToyVLM, capture, prompt


@pytest.mark.parametrize("batch", [1, 2])
def test_finds_the_merge_and_inserts_one_visual_mask(batch):
    torch.manual_seed(0)
    ids, features = prompt(batch=batch, visual=8)
    rec = PassRecorder(ToyVLM().eval(), ids, features, until="span")
    span = rec.record(VisualSpan)
    assert (span.visual_tokens, span.seq_len, span.batch) == (8 * batch, ids.shape[1], batch)
    assert span.merge.target == "masked_scatter"
    assert rec.added("any") == 1  # the [B, N, 1] mask reduced to [B, N]
    assert tuple(tensor_meta(span.visual_mask).shape) == tuple(ids.shape)
    assert rec.pass_result("span").counts == {"visual_tokens": 8 * batch, "seq_len": ids.shape[1]}


def test_samples_with_different_visual_counts_are_one_span():
    """15 features over 2 samples (8 and 7): no per-sample count is assumed, the ops count them."""
    torch.manual_seed(0)
    ids, features = prompt(batch=2, visual=8)
    ids[1, 3] = 5
    gm, example_inputs = capture(ToyVLM().eval(), ids, features[:15])
    result = run_passes(
        prepare(gm, ERAConfig(layer=1), 0, example_inputs), ERAConfig(layer=1), example_inputs, until="span"
    )
    assert result.record(VisualSpan).visual_tokens == 15


def test_no_features_means_nothing_to_prune():
    ids = torch.randint(1, IMAGE, (1, 6))
    rec = PassRecorder(ToyVLM().eval(), ids, torch.randn(0, 32))
    assert rec.result.stopped == "image features are empty (no visual tokens in this graph)"
    assert not rec.result.changed


def test_a_carried_mask_becomes_an_input_the_runtime_supplies():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt(visual=8)
    embeds = model.embed(ids).masked_scatter((ids == IMAGE)[..., None], features).detach()
    gm, example_inputs = capture(
        lambda e: (model.layers[1](model.layers[0](e, torch.ones(1))[0], torch.ones(1))[0],), embeds
    )
    config = ERAConfig(layer=1, keep_tokens=3)
    carried = CarriedVisual(0, ids == IMAGE)
    result = run_passes(prepare(gm, config, 0, example_inputs), config, example_inputs, carried, until="span")
    (added,) = result.added_inputs
    assert isinstance(added, VisualMaskInput) and added.source_input == 0 and added.name == "era_visual_mask"
    assert result.record(VisualSpan).carried_by_input == 0
    assert [n.name for n in result.gm.graph.nodes if n.op == "placeholder"][-1] == "era_visual_mask"
    assert len(result.example_inputs) == len(example_inputs) + 1


def test_features_added_again_after_a_layer_are_a_second_merge_refused():
    """DeepStack spelled without a data-dependent index (``masked_scatter`` into zeros after layer 0)
    stays in one graph: two merges, refused by name rather than pruned with the second one's
    features consumed in order by a gathered mask."""
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt(visual=8)
    cos = torch.ones(1, 1, ids.shape[1], 8)

    def deepstack(ids, features):
        image = (ids == IMAGE)[..., None]
        h = model.layers[0](model.embed(ids).masked_scatter(image, model.project(features)), cos)[0]
        h = h + torch.zeros_like(h).masked_scatter(image, features)
        return (model.head(model.layers[1](h, cos)[0]),)

    with pytest.raises(PassError, match="found 2 image merges"):
        PassRecorder(deepstack, ids, features, until="span")


@pytest.mark.parametrize("layer", [0, 1])
def test_a_scatter_merge_prunes_as_the_masked_scatter_of_the_same_rows(layer):
    """``embeds.scatter(1, positions, features)`` (positions in any order): its visual mask comes
    from the index (not from the merge, which layer 0's selection must not wait for), and the
    pruned toy equals the same toy merging by ``masked_scatter``, batch of 2 included."""
    torch.manual_seed(0)
    model = ToyVLM(merge="scatter").eval()
    ids, features = prompt(batch=2, visual=8)
    config = ERAConfig(layer=layer, keep_tokens=3, compiler="eager", strict=True)
    outputs = {}
    for merge in ("scatter", "method"):
        model.merge = merge
        torch._dynamo.reset()
        backend = make_era_backend(config)
        with torch.no_grad():
            outputs[merge] = torch.compile(model, backend=backend)(ids, features)[0]
        (site,) = backend.report.pruning
        assert (site.visual_tokens, site.kept) == (8, 3)
    assert outputs["scatter"].shape[1] == ids.shape[1] - 8 + 3
    assert (outputs["scatter"] - outputs["method"]).abs().max() < 1e-5
    rec = PassRecorder(ToyVLM(merge="scatter").eval(), ids, features, config=config, until="span")
    assert rec.pass_result("span").counts["merge"] == "scatter" and rec.record(VisualSpan).visual_tokens == 16


def test_a_scatter_of_the_texts_own_rows_is_no_merge():
    """A scatter along the sequence of values the text computed itself (a decoder's own shuffle) is
    not an image merge."""
    embed = ToyVLM().embed

    def shuffle(ids):
        embeds = embed(ids)
        index = torch.arange(ids.shape[1]).flip(0)[None, :, None].expand(1, -1, embeds.shape[-1])
        return (embeds.scatter(1, index, embeds * 2),)

    gm, example_inputs = capture(shuffle, torch.randint(1, IMAGE, (1, 6)))
    assert not scatter_merges(prepare(gm, ERAConfig(), 0, example_inputs).gm, example_inputs)
