"""saliency, kept, restore: a decoder that Dynamo splits into per-layer graphs (a graph break in its
layer loop) runs its layers from K on the kept tokens, each cut at its entry and written back at its
exit, and equals the same decoder pruned in one graph (the cut) at every text position, with the
cut's shapes and FLOPs in those layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from era_compile import ERAConfig, make_era_backend
from toys import DIM, HEADS, IMAGE, VOCAB, ToyVLM, prompt


class HiddenOnly(nn.Module):
    """A toy layer as a split decoder calls it: it returns its hidden states alone, as Hugging Face's
    decoder layers do (their keys and values go into the cache object)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, h, cos):
        return self.layer(h, cos)[0]


class SplitDecoder(nn.Module):
    """The layer loop with a graph break after every layer (as DeepStack's boolean-mask add makes):
    Dynamo traces each layer as a frame of its own, and the loop runs eagerly."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(HiddenOnly(layer) for layer in layers)

    def forward(self, h, cos):
        for layer in self.layers:
            h = layer(h, cos)
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
        kept, cut, plain = split(ids, features), whole(ids, features), model.whole(ids, features)
    # the loop hands back every position (the pruned ones' states are never read); the cut keeps n'
    assert kept.shape[1] == ids.shape[1] and cut.shape[1] == prefix + 3 + suffix
    text = [(slice(0, prefix), slice(0, prefix)), (slice(-suffix, None), slice(-suffix, None))]
    for kept_rows, cut_rows in text:
        assert (kept[:, kept_rows] - cut[:, cut_rows]).abs().max() < 1e-5
    assert (kept[:, -1] - plain[:, -1]).abs().max() > 1e-3  # pruning changed the answer
    (site,) = report.pruning
    assert (site.layer, site.visual_tokens, site.kept) == (layer, 8, 3)
    # the three layers share one graph (same code, same guards): compiled once per part
    parts = {
        0: ["0: prune", "1: kept"],
        1: ["0: saliency", "1: prune", "2: kept"],
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
            kept, cut = split(ids, features), whole(ids, features)
            if features is None:
                assert torch.allclose(kept, model.whole(ids), atol=1e-6)
            else:
                assert (kept[:, -1] - cut[:, -1]).abs().max() < 1e-5
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
    """``rectify=False``: the split decoder adds no LAR bias in its layers from K (nor through the key
    bias layer K hands on), so it equals the same decoder cut in one graph with rectify=False at every
    text position; the rectified split decoder answers otherwise (the bias is not zero: a split decoder
    that always rectified would be seen)."""
    torch.manual_seed(0)
    model = SplitToy().eval()
    prefix, suffix = 3, 5
    ids, features = prompt(prefix=prefix, visual=8, suffix=suffix)
    config = ERAConfig(layer=1, keep_tokens=3, rectify=False, compiler="eager", strict=True)
    torch._dynamo.reset()
    backend = make_era_backend(config)
    split, whole = torch.compile(model, backend=backend), torch.compile(model.whole, backend=make_era_backend(config))
    with torch.no_grad():
        kept, cut, plain = split(ids, features), whole(ids, features), model.whole(ids, features)
    assert [(p.visual_tokens, p.kept) for p in backend.report.pruning] == [(8, 3)]
    assert (kept[:, -1] - plain[:, -1]).abs().max() > 1e-3  # pruning changed the answer
    for kept_rows, cut_rows in [(slice(0, prefix), slice(0, prefix)), (slice(-suffix, None), slice(-suffix, None))]:
        assert (kept[:, kept_rows] - cut[:, cut_rows]).abs().max() < 1e-5
    torch._dynamo.reset()
    with torch.no_grad():
        rectified = torch.compile(model, backend=make_era_backend(config.replace(rectify=True)))(ids, features)
    assert (rectified[:, -suffix:] - kept[:, -suffix:]).abs().max() > 1e-3


def _toy_layer_flops(length: int) -> int:
    """A toy layer's matmul FLOPs on ``length`` tokens (batch 1): its q, k, v, o and MLP linear layers
    (2 * length * D^2 each), and attention's QK^T and PV (2 * length^2 * D each)."""
    return 5 * 2 * length * DIM**2 + 2 * 2 * length**2 * DIM


def test_layers_from_k_run_on_the_kept_tokens(graph_calls):
    """The cut, as the graphs run: layer K's graph (it recycles) and layer K + 1's (it reads what
    layer K kept off its key bias, ``era::kept_tokens``) attend with n' queries, the kept tokens,
    not the prompt's N; their FLOPs are a layer's at n'."""
    torch.manual_seed(0)
    model = SplitToy().eval()
    ids, features = prompt(prefix=3, visual=8, suffix=5)
    split, report = _compiled(model, ERAConfig(layer=1, keep_tokens=3, compiler="eager", strict=True))
    with torch.no_grad():
        split(ids, features)
    N, n = ids.shape[1], report.pruning[0].seq_len_after
    assert (N, n) == (16, 3 + 3 + 5)
    layer_k = [c for c in graph_calls if "recycle" in c.era_ops]
    after_k = [c for c in graph_calls if "kept_tokens" in c.era_ops]
    assert len(layer_k) == len(after_k) == 1
    for call in layer_k + after_k:
        assert call.attention_queries == ((1, HEADS, n, DIM // HEADS),)
        assert call.flops == _toy_layer_flops(n) < _toy_layer_flops(N)


def test_a_split_prefill_costs_the_cut_plus_its_head_on_the_pruned_positions(graph_calls):
    """Counted as the graphs run (FlopCounterMode, ``era::biased_attention`` as the attention it is),
    the split decoder's prefill costs what the same decoder cut in one graph does, but for its LM
    head: the loop hands it back every position, N - n' more than the cut's. Its layers from K
    cost the cut's (a layer at n' each)."""
    torch.manual_seed(0)
    model = SplitToy().eval()
    ids, features = prompt(prefix=3, visual=8, suffix=5)
    config = ERAConfig(layer=1, keep_tokens=3, compiler="eager", strict=True)
    split, report = _compiled(model, config)
    with torch.no_grad():
        split(ids, features)
    split_calls = list(graph_calls)
    graph_calls.clear()
    whole, _ = _compiled(model.whole, config)
    with torch.no_grad():
        whole(ids, features)
    N, n = ids.shape[1], report.pruning[0].seq_len_after
    from_k = [c.flops for c in split_calls if c.era_ops & {"recycle", "kept_tokens"}]
    assert from_k == [_toy_layer_flops(n)] * 2
    head_per_position = 2 * DIM * VOCAB
    assert sum(c.flops for c in split_calls) == sum(c.flops for c in graph_calls) + head_per_position * (N - n)
