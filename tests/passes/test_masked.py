"""masked: a decoder that Dynamo splits into per-layer graphs (a graph break in its layer loop)
prunes by masking the pruned tokens out of the later layers' keys, and equals the same decoder
pruned in one graph (the cut) at every text position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from era_compile import ERAConfig, make_era_backend
from toys import IMAGE, ToyVLM, prompt


class SplitDecoder(nn.Module):
    """The layer loop with a graph break after every layer (as DeepStack's boolean-mask add makes):
    Dynamo traces each layer as a frame of its own, and the loop runs eagerly."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, h, cos):
        for layer in self.layers:
            h = layer(h, cos)[0]
            torch._dynamo.graph_break()
        return h


class SplitToy(ToyVLM):
    """The toy with its merge and positions in the outer frame, its layers behind the split loop."""

    def __init__(self):
        super().__init__()
        self.decoder = SplitDecoder(self.layers)

    def forward(self, input_ids, image_features=None):
        embeds = self.embed(input_ids)
        if image_features is not None:
            embeds = embeds.masked_scatter((input_ids == IMAGE)[..., None], self.project(image_features))
        cos = torch.cos(torch.arange(input_ids.shape[1])[:, None] * self.inv_freq[None, :])[None, None]
        return self.head(self.decoder(embeds, cos))

    def whole(self, input_ids, image_features=None):
        """The same model with its layers in one graph (the cut path)."""
        return ToyVLM.forward(self, input_ids, image_features)[0]


def _compiled(fn, config):
    torch._dynamo.reset()
    backend = make_era_backend(config)
    return torch.compile(fn, backend=backend), backend.report


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_a_split_decoder_equals_the_cut_at_every_text_position(layer):
    torch.manual_seed(0)
    model = SplitToy().eval()
    prefix, suffix = 3, 5
    ids, features = prompt(prefix=prefix, visual=8, suffix=suffix)
    config = ERAConfig(layer=layer, keep_tokens=3, compiler="eager", strict=True)
    split, report = _compiled(model, config)
    whole, whole_report = _compiled(model.whole, config)
    with torch.no_grad():
        masked, cut, plain = split(ids, features), whole(ids, features), model.whole(ids, features)
    assert masked.shape[1] == ids.shape[1] and cut.shape[1] == prefix + 3 + suffix  # kept every position; cut
    text = [(slice(0, prefix), slice(0, prefix)), (slice(-suffix, None), slice(-suffix, None))]
    for masked_rows, cut_rows in text:
        assert (masked[:, masked_rows] - cut[:, cut_rows]).abs().max() < 1e-5
    assert (masked[:, -1] - plain[:, -1]).abs().max() > 1e-3  # pruning changed the answer
    (site,) = report.pruning
    assert (site.layer, site.visual_tokens, site.kept) == (layer, 8, 3)
    # the three layers share one graph (same code, same guards): compiled once per part
    parts = {
        0: ["0: prune", "1: masked"],
        1: ["0: saliency", "1: prune", "2: masked"],
        2: ["unpruned", "1: saliency", "2: prune"],
    }[layer]
    assert report.variants[min(report.variants)] == [
        p if p == "unpruned" else f"layer {p[0]} of a split decoder:{p[2:]}" for p in parts
    ]
    assert any("split into per-layer graphs" in note for note in report.notes)


def test_a_split_decoder_serves_other_lengths_and_text_only_prompts():
    """One compiled model: an image prompt, a text-only one (it runs unpruned and silent: the walk
    of the image before ended), an image prompt of another length (Dynamo recompiles the layer's
    graph with a dynamic length); each equals the cut at its text positions."""
    torch.manual_seed(0)
    model = SplitToy().eval()
    config = ERAConfig(layer=1, keep_tokens=3, compiler="eager", strict=True)
    split, report = _compiled(model, config)
    whole = torch.compile(model.whole, backend=make_era_backend(config))
    text_only = torch.randint(1, IMAGE, (1, 9))
    with torch.no_grad():
        for ids, features in (prompt(visual=8), (text_only, None), prompt(prefix=4, visual=6, suffix=7, seed=2)):
            masked, cut = split(ids, features), whole(ids, features)
            if features is None:
                assert torch.allclose(masked, model.whole(ids), atol=1e-6)
            else:
                assert (masked[:, -1] - cut[:, -1]).abs().max() < 1e-5
    assert report.pruned_calls == 2 and not report.unpruned_images and not report.fallbacks


def test_a_layer_the_split_decoder_does_not_have_is_told():
    """K past the last layer: the walk passes every layer without pruning, and the graph that runs
    on the prompt next says so (strict: raises), naming the layers walked and K."""
    from era_compile.backend import EraCompileError

    torch.manual_seed(0)
    model = SplitToy().eval()
    split, _ = _compiled(model, ERAConfig(layer=5, keep_tokens=3, compiler="eager", strict=True))
    with (
        torch.no_grad(),
        pytest.raises(
            EraCompileError,
            match=r"after 3 layers of its decoder, which is split into "
            r"per-layer graphs, and none was layer 5",
        ),
    ):
        split(*prompt(visual=8))


def test_a_split_decoder_without_rectify_equals_the_cut_without_rectify():
    """``rectify=False``: the split decoder masks the pruned keys but adds no LAR bias, so it equals
    the same decoder cut in one graph with rectify=False at every text position; the rectified split
    decoder answers otherwise (the bias is not zero: a split decoder that always rectified would be
    seen)."""
    torch.manual_seed(0)
    model = SplitToy().eval()
    prefix, suffix = 3, 5
    ids, features = prompt(prefix=prefix, visual=8, suffix=suffix)
    config = ERAConfig(layer=1, keep_tokens=3, rectify=False, compiler="eager", strict=True)
    torch._dynamo.reset()
    backend = make_era_backend(config)
    split, whole = torch.compile(model, backend=backend), torch.compile(model.whole, backend=make_era_backend(config))
    with torch.no_grad():
        masked, cut, plain = split(ids, features), whole(ids, features), model.whole(ids, features)
    assert [(p.visual_tokens, p.kept) for p in backend.report.pruning] == [(8, 3)]
    assert (masked[:, -1] - plain[:, -1]).abs().max() > 1e-3  # pruning changed the answer
    for masked_rows, cut_rows in [(slice(0, prefix), slice(0, prefix)), (slice(-suffix, None), slice(-suffix, None))]:
        assert (masked[:, masked_rows] - cut[:, cut_rows]).abs().max() < 1e-5
    torch._dynamo.reset()
    with torch.no_grad():
        rectified = torch.compile(model, backend=make_era_backend(config.replace(rectify=True)))(ids, features)
    assert (rectified[:, -suffix:] - masked[:, -suffix:]).abs().max() > 1e-3
