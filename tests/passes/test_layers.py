"""layers: decoder layers by structure (indexed modules with attention after the merge)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from era_compile import ERAConfig
from era_compile.passes.graph_pass import PassError
from era_compile.passes.kinds import is_layer_forward
from era_compile.passes.manager import prepare, run_passes
from era_compile.passes.records import CarriedVisual, DecoderLayers, VisualSpan
from toys import DIM, LAYERS, PassRecorder, ToyLayer, ToyVLM, capture, prompt


def test_every_layer_with_its_attention_and_residual_stream():
    torch.manual_seed(0)
    rec = PassRecorder(ToyVLM().eval(), *prompt(), until="layers")
    layers = rec.record(DecoderLayers)
    assert len(layers) == LAYERS and [layer.index for layer in layers.layers] == list(range(LAYERS))
    assert [layer.module_path.rsplit(".", 1)[1] for layer in layers.layers] == ["0", "1", "2"]
    assert layers[0].hidden_in is rec.record(VisualSpan).merge  # layer 0 reads the merged embeddings
    assert all(layer.attention in layer.nodes for layer in layers.layers)
    assert rec.after == rec.before | {"any": 1}  # found, not changed (span's mask is the one new node)


def test_a_layer_the_model_does_not_have_is_named():
    torch.manual_seed(0)
    with pytest.raises(PassError, match="ERAConfig.layer=5 but the language model has 3 decoder layers"):
        PassRecorder(ToyVLM().eval(), *prompt(), config=ERAConfig(layer=5), until="layers")


def test_eager_attention_is_refused_with_what_to_do():
    torch.manual_seed(0)
    model = ToyVLM().eval()

    def eager_sdpa(q, k, v, attn_mask=None, is_causal=False):
        w = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        return w.softmax(-1) @ v

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = eager_sdpa
    try:
        gm, example_inputs = capture(model, *prompt())
    finally:
        F.scaled_dot_product_attention = original
    config = ERAConfig(layer=1)
    with pytest.raises(PassError, match="attn_implementation='sdpa'"):
        run_passes(prepare(gm, config, 0, example_inputs), config, example_inputs, until="layers")


class _ShortConvLayer(ToyLayer):
    """A toy layer with a causal depthwise 1-D convolution along the positions before its attention,
    its weight passed by keyword (as inkling's ``causal_conv1d_fn`` does)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(DIM, DIM, 3, groups=DIM, padding=2)

    def forward(self, h, cos, **kwargs):
        x = h.transpose(1, 2)
        h = h + F.conv1d(x, weight=self.conv.weight, padding=2, groups=DIM)[..., : h.shape[1]].transpose(
            1, 2
        )  # weight=: a keyword
        return super().forward(h, cos, **kwargs)


def test_a_convolution_along_the_positions_runs_on_the_kept_tokens_from_k_on():
    """A convolution beside a layer's attention is cut with it: from K on it runs on the kept tokens
    (``F.conv1d(..., padding=2)[..., :N]`` follows the pruned length), before K on every token."""
    torch.manual_seed(0)
    model = ToyVLM().eval()
    model.layers[2] = _ShortConvLayer()
    rec = PassRecorder(model, *prompt(), config=ERAConfig(layer=1), until="prune")
    assert len(rec.record(DecoderLayers)) == LAYERS and not rec.record(DecoderLayers).without_attention


class _ConvOnlyLayer(torch.nn.Module):
    """A hybrid decoder's layer without attention: a causal depthwise convolution along the positions."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(DIM, DIM, 3, groups=DIM, padding=2)

    def forward(self, h, cos, **kwargs):
        return h + self.conv(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2), None  # no KV cache


def test_a_hybrid_decoder_is_cut_at_an_attention_layer_and_a_k_without_one_is_named():
    """Layers that call no attention are numbered beside the attention ones; K on one of them is refused
    with the layers it could be, and K on the attention layer after it cuts (the convolution layers
    after K run on the kept tokens), its saliency read off its own queries and keys."""
    torch.manual_seed(0)
    model = ToyVLM().eval()
    model.layers[1] = _ConvOnlyLayer()
    with pytest.raises(PassError, match=r"ERAConfig.layer=1 names a layer without softmax attention .* \[0, 2\]"):
        PassRecorder(model, *prompt(), config=ERAConfig(layer=1), until="layers")
    rec = PassRecorder(model, *prompt(), config=ERAConfig(layer=2), until="prune")
    layers = rec.record(DecoderLayers)
    assert [layer.index for layer in layers.layers] == [0, 2] and layers.without_attention == {1}
    model.layers[0], model.layers[1] = model.layers[1], model.layers[0]  # layer 0 without attention, K = 1
    rec = PassRecorder(model, *prompt(), config=ERAConfig(layer=1), until="prune")
    assert rec.record(DecoderLayers).without_attention == {0}


def test_a_decoder_layers_own_graph_is_refused_with_why():
    """A layer loop with a graph break between layers: Dynamo traces each layer as a frame of its
    own, with no layer index around it. The runtime walks such layers (``test_split``); taken for
    a carried prefill it is refused by name, never cut (the eager loop hands the next layer
    full-length positions). A whole decoder is no such graph."""
    torch.manual_seed(0)
    model = ToyVLM().eval()
    hidden, cos = torch.randn(1, 16, DIM), torch.ones(1, 1, 16, DIM // 4)
    gm, example_inputs = capture(model.layers[0], hidden, cos)  # the layer as the frame, as Dynamo makes it
    prepared = prepare(gm, ERAConfig(layer=0), 0, example_inputs)
    assert is_layer_forward(prepared.gm)
    carried = CarriedVisual(0, torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(
        PassError, match=r"a decoder layer's own forward \(the decoder is split into per-layer graphs\)"
    ):
        run_passes(prepared, ERAConfig(layer=0), example_inputs, carried)
    whole, whole_inputs = capture(model, *prompt())
    assert not is_layer_forward(prepare(whole, ERAConfig(), 0, whole_inputs).gm)
