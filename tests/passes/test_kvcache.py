"""kvcache: the cache writes (cat onto the past) and the past-key inputs; a static cache named."""

from __future__ import annotations

import pytest
import torch

from era_compile import ERAConfig
from era_compile.compact_kv import compact
from era_compile.passes.graph_pass import PassError
from era_compile.passes.kinds import GraphKind
from era_compile.passes.records import KVCache
from toys import DIM, HEADS, LAYERS, PassRecorder, ToyVLM, past_cache, prompt


def test_decode_step_cache_writes_and_past_inputs():
    torch.manual_seed(0)
    ids, _ = prompt()
    rec = PassRecorder(ToyVLM().eval(), ids[:, :1], None, past_cache(), until="kvcache")
    cache = rec.record(KVCache)
    assert rec.kind is GraphKind.DECODE
    assert [c.index for c in cache.layers] == list(range(LAYERS))
    inputs = [n for n in rec.result.gm.graph.nodes if n.op == "placeholder"]
    outputs = list(rec.result.gm.graph.output_node().args[0])
    for c in cache.layers:
        assert c.past_keys in inputs and c.keys.target is torch.cat and c.keys.args[0][0] is c.past_keys
        assert outputs[c.keys_output] is c.keys and outputs[c.values_output] is c.values
    assert rec.after == rec.before  # analysis only


class _GQALayer(torch.nn.Module):
    """4 query heads over 2 KV heads, with Hugging Face's repeat_kv between the cache and SDPA."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)

    def forward(self, x, past):
        heads = lambda t, n: t.view(1, x.shape[1], n, 8).transpose(1, 2)  # noqa: E731
        k = torch.cat([past[0], heads(self.k(x), 2)], dim=-2)
        v = torch.cat([past[1], heads(self.v(x), 2)], dim=-2)
        rep = lambda t: t[:, :, None].expand(1, 2, 2, t.shape[2], 8).reshape(1, 4, t.shape[2], 8)  # noqa: E731
        return torch.nn.functional.scaled_dot_product_attention(heads(self.q(x), 4), rep(k), rep(v)), k, v


class _GQA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_GQALayer()])

    def forward(self, x, past):
        return self.layers[0](x, past)


def test_gqa_repeat_is_followed_back_to_the_cache_write():
    """repeat_kv (index, expand, reshape) between the cat and SDPA: the walk keeps the sequence size."""
    past = (torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
    rec = PassRecorder(_GQA().eval(), torch.randn(1, 1, 32), past, until="kvcache")
    (layer,) = rec.record(KVCache).layers
    assert layer.index == 0 and layer.keys.target is torch.cat and layer.past_keys is not None


def test_fresh_prefill_writes_have_no_past():
    torch.manual_seed(0)
    ids, features = prompt()
    empty = [(torch.zeros(1, HEADS, 0, 8), torch.zeros(1, HEADS, 0, 8)) for _ in range(LAYERS)]
    rec = PassRecorder(ToyVLM().eval(), ids, features, empty, until="kvcache")
    cache = rec.record(KVCache)
    # an empty past is still a graph input here; the layers are found either way
    assert len(cache.layers) == LAYERS


def test_a_static_cache_in_a_prefill_that_would_prune_is_refused_by_name():
    torch.manual_seed(0)
    ids, features = prompt()
    static = [(torch.zeros(1, HEADS, 32, 8), torch.zeros(1, HEADS, 32, 8)) for _ in range(LAYERS)]
    with pytest.raises(PassError, match=r"cache_implementation='static'"):
        PassRecorder(ToyVLM().eval(), ids, features, None, None, static, until="kvcache")
    # the same cache in a decode step is only listed (nothing there was pruned)
    rec = PassRecorder(
        ToyVLM().eval(), ids[:, :1], None, None, None, static, config=ERAConfig(layer=1), until="kvcache"
    )
    assert rec.record(KVCache).written_in_place == tuple(range(LAYERS)) and not rec.record(KVCache).layers


class _WindowedVLM(ToyVLM):
    """ToyVLM whose layers cache only part of what they attended over: the last 4 positions (a
    sliding-window cache: HF's DynamicSlidingWindowLayer returns the whole cat, stores a slice of
    it), or, ``head=True``, the first 4 (no cache does that)."""

    def __init__(self, head: bool = False):
        super().__init__()
        self.head_slice = head

    def forward(self, input_ids, image_features=None, past=None, mask=None, static=None):
        logits, cache = super().forward(input_ids, image_features, past, mask)
        part = (lambda t: t[:, :, :4]) if self.head_slice else (lambda t: t[:, :, -4:])
        return logits, [(part(k), part(v)) for k, v in cache]


def _empty_past():
    return [(torch.zeros(1, HEADS, 0, DIM // HEADS), torch.zeros(1, HEADS, 0, DIM // HEADS)) for _ in range(LAYERS)]


def test_a_sliding_window_cache_write_is_recorded_with_its_window():
    """The output is cat[..., -4:, :]: recorded, so the runtime can window the pruned rows by their
    original positions (before, such layers were skipped, and a decode ran silently on a plain
    window of the kept rows, without their positions or bias)."""
    torch.manual_seed(0)
    ids, features = prompt()
    rec = PassRecorder(_WindowedVLM().eval(), ids, features, _empty_past(), until="kvcache")
    layers = rec.record(KVCache).layers
    assert [c.index for c in layers] == list(range(LAYERS)) and {c.window_start for c in layers} == {-4}
    outputs = list(rec.result.gm.graph.output_node().args[0])
    assert all(outputs[c.keys_output].args[0] is c.keys for c in layers)  # the slice of the cat


def test_a_cache_of_another_part_of_the_keys_is_refused_in_a_pruned_prefill():
    torch.manual_seed(0)
    ids, features = prompt()
    with pytest.raises(PassError, match=r"layers \[1, 2\] cache part of the keys they attend to"):
        PassRecorder(_WindowedVLM(head=True).eval(), ids, features, _empty_past(), until="kvcache")


class _TwoPartCacheLayer(torch.nn.Module):
    """A decode step over a cache of two parts: the prompt's keys kept apart, and a window of the
    last 4 generated ones; it attends over both and caches back only the window."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x, prompt_kv, window_kv):
        heads = lambda t: t.view(1, x.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
        window = [
            torch.cat([w, heads(proj(x))], dim=-2)[:, :, -4:]
            for w, proj in zip(window_kv, (self.k, self.v), strict=True)
        ]
        k, v = (torch.cat([p, w], dim=-2) for p, w in zip(prompt_kv, window, strict=True))
        return torch.nn.functional.scaled_dot_product_attention(heads(self.q(x)), k, v), window


class _TwoPartCache(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_TwoPartCacheLayer()])

    def forward(self, x, prompt_kv, window_kv):
        return self.layers[0](x, prompt_kv, window_kv)


def test_a_decode_step_over_a_two_part_cache_reads_its_prompt_part_as_the_past():
    """The layer is recorded with the prompt part as its past (a pruned prefill made that a
    CompactKV, whose attention adds the bias) and no output of its own: it had been skipped, so a
    decode step over a pruned cache was not counted."""
    d = DIM // HEADS
    compact_past = [
        compact(torch.randn(1, HEADS, 5, d), torch.tensor([[0, 2, 3, 6, 7]]), torch.zeros(1, 5), 9) for _ in range(2)
    ]
    window = [torch.randn(1, HEADS, 3, d) for _ in range(2)]
    rec = PassRecorder(_TwoPartCache().eval(), torch.randn(1, 1, DIM), compact_past, window, until="kvcache")
    (layer,) = rec.record(KVCache).layers
    assert rec.kind is GraphKind.DECODE
    assert layer.past_keys is not None and layer.compact and layer.keys_output is None and layer.values_output is None
