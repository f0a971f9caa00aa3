"""CompactKV: what Hugging Face does to a cache tensor, done to the stored rows, and attention over
it equal to attention over the original positions (written out densely here); compiled by Dynamo
and Inductor; anything else fails naming the op."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from era_compile.compact_kv import CompactKV, compact, stored_bytes, stored_rows

B, H, D, N = 2, 4, 8, 12


def _cache(seed=0, kept=(0, 1, 4, 7, 10, 11)):
    """Keys at the kept positions of N, with a bias on two of them (anchors)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(B, H, N, D, generator=g)
    keep = torch.tensor([list(kept)] * B)
    bias = torch.zeros(B, len(kept))
    bias[:, 2], bias[1, 3] = math.log(3.0), math.log(2.0)
    rows = dense.gather(2, keep[:, None, :, None].expand(B, H, len(kept), D))
    return dense, keep, bias, compact(rows, keep, bias, N)


def _dense_attention(q, dense_k, dense_v, keep, bias, mask, extra_k=None, extra_v=None):
    """softmax over the kept original positions (and the appended keys) with the bias added."""
    scores = q @ dense_k.transpose(-1, -2) / math.sqrt(D)  # [B, H, Lq, N]
    full_bias = torch.full((B, N), float("-inf"))
    full_bias.scatter_(1, keep, bias)
    scores = scores + full_bias[:, None, None, :]
    values = dense_v
    if extra_k is not None:
        scores = torch.cat([scores, q @ extra_k.transpose(-1, -2) / math.sqrt(D)], -1)
        values = torch.cat([dense_v, extra_v], 2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ values


def test_logical_shape_and_what_is_stored():
    _, keep, _, k = _cache()
    assert k.shape == (B, H, N, D) and stored_rows(k) == 6
    assert stored_bytes(k) == B * H * 6 * D * 4 + B * 6 * 8 + B * 6 * 4
    assert stored_rows(torch.zeros(B, H, 5, D)) == 5
    assert "6 rows stored" in repr(k)


def test_cache_key_names_shapes_not_values():
    """Compile caches key a CompactKV input by its shapes and dtypes (and never pickle its
    possibly symbolic size): equal for equal layouts, different when the stored rows differ."""
    _, _, _, k = _cache()
    _, _, _, same = _cache(seed=1)
    _, _, _, fewer = _cache(kept=(0, 2, 4, 6, 11))
    assert k._stable_hash_for_caching() == same._stable_hash_for_caching()
    assert k._stable_hash_for_caching() != fewer._stable_hash_for_caching()


def test_cache_bytes_counts_shared_storage_once():
    """Keys and values of a layer share their positions and bias: a cache's bytes count them once."""
    from types import SimpleNamespace

    from era_compile.compact_kv import cache_bytes

    _, keep, bias, k = _cache()
    v = compact(torch.randn(B, H, 6, D), k.positions, k.bias, N)
    plain = torch.zeros(B, H, N, D)
    cache = SimpleNamespace(
        layers=[SimpleNamespace(keys=plain, values=plain.clone()), SimpleNamespace(keys=k, values=v)]
    )
    rows = B * H * 6 * D * 4
    assert stored_bytes(k, v) == 2 * rows + B * 6 * 8 + B * 6 * 4
    assert cache_bytes(cache) == 2 * plain.numel() * 4 + stored_bytes(k, v)


def test_append_then_attend_equals_attention_over_the_original_positions():
    dense_k, keep, bias, k = _cache(0)
    dense_v, _, _, v = _cache(1)
    new_k, new_v = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    k2, v2 = torch.cat([k, new_k], dim=-2), torch.cat([v, new_v], dim=-2)
    assert k2.shape[-2] == N + 1 and stored_rows(k2) == 7
    assert k2.positions[:, -1].tolist() == [N, N]  # the generated token sits at the next original position
    q = torch.randn(B, H, 1, D)
    mask = torch.ones(B, 1, 1, N + 1, dtype=torch.bool)
    mask[1, ..., :2] = False  # sample 1 left-padded by two: its first two keys are padding
    out = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    expected = _dense_attention(q, dense_k, dense_v, keep, bias, mask, new_k, new_v)
    assert torch.allclose(out, expected, atol=1e-5)
    without_bias = F.scaled_dot_product_attention(
        q, compact(k2.rows, k2.positions, torch.zeros_like(k2.bias), N + 1), v2, attn_mask=mask
    )
    assert (without_bias - out).abs().max() > 1e-3  # the bias is what moved the output


def test_repeat_kv_index_select_and_casts_act_on_the_rows():
    _, keep, bias, k = _cache()
    repeated = k[:, :, None, :, :].expand(B, H, 2, N, D).reshape(B, 2 * H, N, D)  # HF's repeat_kv
    assert isinstance(repeated, CompactKV) and repeated.shape == (B, 2 * H, N, D) and stored_rows(repeated) == 6
    assert torch.equal(repeated.rows[:, 1], k.rows[:, 0]) and torch.equal(repeated.rows[:, 2], k.rows[:, 1])
    order = torch.tensor([1, 0])
    swapped = k.index_select(0, order)  # beam search's reorder
    assert torch.equal(swapped.rows, k.rows[order]) and torch.equal(swapped.bias, k.bias[order])
    half = k.to(torch.float16)
    assert half.dtype == torch.float16 and half.rows.dtype == torch.float16 and half.bias.dtype == torch.float32
    assert torch.equal(k.clone().rows, k.rows) and torch.equal(k.detach().positions, keep)


@pytest.mark.parametrize(
    "op", [lambda k: k == 0, lambda k: k.sum(), lambda k: k[:, :, :3], lambda k: k @ k.transpose(-1, -2)]
)
def test_anything_else_fails_naming_the_op(op):
    with pytest.raises(NotImplementedError, match="CompactKV"):
        op(_cache()[3])


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_decode_step_over_it(backend):
    """Dynamo traces a decode step (append, GQA repeat, SDPA with a mask) with CompactKV inputs, and
    AOTAutograd / Inductor compile its inner tensors; the result equals eager."""
    _, _, _, k = _cache(0)
    _, _, _, v = _cache(1)
    q, new = torch.randn(B, 2 * H, 1, D), torch.randn(B, H, 1, D)
    mask = torch.ones(B, 1, 1, N + 1, dtype=torch.bool)
    mask[0, ..., 0] = False

    def step(q, k, v, new, mask):
        k, v = torch.cat([k, new], dim=-2), torch.cat([v, new], dim=-2)
        rep = lambda t: t[:, :, None, :, :].expand(B, H, 2, t.shape[2], D).reshape(B, 2 * H, t.shape[2], D)  # noqa: E731
        return F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask), k

    expected, _ = step(q, k, v, new, mask)
    torch._dynamo.reset()
    out, k2 = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, new, mask)
    assert torch.allclose(out, expected, atol=1e-5)
    assert isinstance(k2, CompactKV) and stored_rows(k2) == 7


def test_a_sliding_window_slice_keeps_the_last_positions_of_the_original_sequence():
    """HF's sliding-window cache keeps ``keys[..., -(W - 1):, :]``: the last W - 1 original positions.
    Kept rows before them are blocked, positions count from the window's start (the next step's
    mask offset), and attention equals dense attention over the window's kept positions."""
    dense, keep, bias, k = _cache()
    _, _, _, v = _cache(seed=1)
    dense_v = _cache(seed=1)[0]
    w, wv = k[:, :, -6:, :], v[:, :, -6:, :]  # positions 6..11 of 12
    assert isinstance(w, CompactKV) and w.shape[2] == 6 and stored_rows(w) == stored_rows(k)
    assert w.positions[0].tolist() == [0, 0, 0, 1, 4, 5]  # rows at 0, 1, 4 are before the window
    assert bool((w.bias[:, :3] < -1e30).all()) and torch.equal(w.bias[:, 3:], bias[:, 3:])
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, 1, 1, 6, dtype=torch.bool)
    out = F.scaled_dot_product_attention(q, w, wv, attn_mask=mask)
    in_window = torch.zeros(B, 1, 1, N, dtype=torch.bool)
    in_window[..., 6:] = True
    torch.testing.assert_close(out, _dense_attention(q, dense, dense_v, keep, bias, in_window))
    assert k[:, :, -20:, :].shape[2] == N and torch.equal(k[:, :, -20:, :].positions, keep)  # window not full yet


def _end_aligned_causal(q_len, length, own=True):
    """bool [q_len, length]: query i sits at original position length - q_len + i and sees every key
    at a position <= its own (``own=False``: strictly before it)."""
    query_positions = torch.arange(length - q_len, length)[:, None]
    keys = torch.arange(length)[None, :]
    return keys <= query_positions if own else keys < query_positions


@pytest.mark.parametrize("appended, q_len", [(0, 3), (0, 1), (1, 1), (1, 4)])
def test_is_causal_without_a_mask_lets_each_query_see_the_key_at_its_own_position(appended, q_len):
    """``is_causal=True`` and no mask over CompactKV keys equals plain SDPA over the uncompressed keys
    with a float mask built here: the LAR bias at the kept keys, -inf at the dropped ones, and an
    end-aligned causal mask in original positions (the queries are the last ``q_len`` positions; a
    query sees the key at its own position). The queries sit on kept keys (10, 11) or on a generated
    one (12), so a mask that hides a query's own key gives another answer (checked too)."""
    dense_k, keep, bias, k = _cache(0)
    dense_v, _, _, v = _cache(1)
    g = torch.Generator().manual_seed(3)
    if appended:
        new_k, new_v = torch.randn(B, H, appended, D, generator=g), torch.randn(B, H, appended, D, generator=g)
        k, v = torch.cat([k, new_k], dim=-2), torch.cat([v, new_v], dim=-2)
        dense_k, dense_v = torch.cat([dense_k, new_k], 2), torch.cat([dense_v, new_v], 2)
    length = N + appended
    q = torch.randn(B, H, q_len, D, generator=g)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)

    key_bias = torch.full((B, length), float("-inf"))
    key_bias[:, N:] = 0.0  # generated keys: bias 0
    key_bias.scatter_(1, keep, bias)
    causal = _end_aligned_causal(q_len, length)
    mask = key_bias[:, None, None, :].masked_fill(~causal[None, None], float("-inf"))
    expected = F.scaled_dot_product_attention(q, dense_k, dense_v, attn_mask=mask)
    assert torch.allclose(out, expected, atol=1e-5)

    strictly_before = key_bias[:, None, None, :].masked_fill(
        ~_end_aligned_causal(q_len, length, own=False)[None, None], float("-inf")
    )
    hidden_self = F.scaled_dot_product_attention(q, dense_k, dense_v, attn_mask=strictly_before)
    assert (hidden_self - expected).abs().max() > 1e-3  # the check has teeth: one's own key matters
