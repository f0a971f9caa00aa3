"""decode: attention over a past cache in layers >= K reads the cached keys' bias, a graph input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from toys import LAYERS, PassRecorder, ToyVLM, past_cache, prompt

from era_compile import ERAConfig
from era_compile.passes.records import CacheBiasRead, KVCache, PastBiasInput


def _decode(layer=1):
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids = prompt()[0][:, :1]
    return model, ids, PassRecorder(model, ids, None, past_cache(length=10), config=ERAConfig(layer=layer))


def test_one_bias_input_per_rectified_layer():
    model, _, rec = _decode(layer=1)
    read = rec.record(CacheBiasRead)
    assert read.layers == [1, 2] and rec.added("era.biased_attention") == LAYERS - 1
    inputs = [n for n in rec.result.gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in inputs[-2:]] == ["era_past_bias_1", "era_past_bias_2"]
    cache = rec.record(KVCache)
    for added in read.inputs:
        assert isinstance(added, PastBiasInput)
        assert inputs[added.past_keys_input] is cache.layer(added.layer).past_keys
        assert tuple(added.example.shape) == (1, 10)  # [B, L_past]
    assert len(rec.result.example_inputs) == len(rec.example_inputs) + 2


def test_the_bias_input_reaches_the_logits_and_zero_is_plain_attention():
    model, _, rec = _decode(layer=1)
    zeros = [torch.zeros(1, 10), torch.zeros(1, 10)]
    bias = [torch.zeros(1, 10), torch.zeros(1, 10)]
    bias[0][0, 3], bias[1][0, 7] = 2.0, -1.5
    with torch.no_grad():
        plain = rec.gm(*rec.example_inputs)[0]
        with_zero = rec.result.gm(*rec.example_inputs, *zeros)[0]
        with_bias = rec.result.gm(*rec.example_inputs, *bias)[0]
    assert torch.allclose(with_zero, plain, atol=1e-6)
    assert (with_bias - plain).abs().max() > 1e-3


def test_the_rectified_attention_is_attention_with_that_key_bias():
    """One layer written out with the toy's own modules: softmax(q k^T / sqrt(d) + bias) v."""
    model, ids, rec = _decode(layer=LAYERS - 1)
    bias = torch.randn(1, 10)
    with torch.no_grad():
        logits = rec.result.gm(*rec.example_inputs, bias)[0]
        cache = past_cache(length=10)
        h = model.embed(ids)
        positions = torch.arange(10, 11)
        cos = torch.cos(positions[:, None] * model.inv_freq[None, :])[None, None]
        for i, layer in enumerate(model.layers):
            if i < LAYERS - 1:
                h, _ = layer(h, cos, past=cache[i])
                continue
            x = layer.norm(h)
            q = layer.q(x).view(1, 1, 4, -1).transpose(1, 2) * cos
            k = torch.cat([cache[i][0], layer.k(x).view(1, 1, 4, -1).transpose(1, 2) * cos], -2)
            v = torch.cat([cache[i][1], layer.v(x).view(1, 1, 4, -1).transpose(1, 2)], -2)
            full_bias = torch.cat([bias, torch.zeros(1, 1)], -1)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=full_bias)
            h = h + layer.o(out.transpose(1, 2).reshape(1, 1, -1))
            h = h + layer.mlp(h)
        expected = model.head(h)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_no_past_in_the_pruned_layers_means_nothing_to_do():
    torch.manual_seed(0)
    rec = PassRecorder(ToyVLM().eval(), prompt()[0][:, :1], None, past_cache(), config=ERAConfig(layer=5))
    assert rec.pass_result("decode").skipped == "no attention over a past KV cache in layers >= K"
    assert not rec.result.changed
