"""Exactness tests of the pure-tensor algorithms (ALGORITHMS.md section 9), CPU, float64 where exactness is pinned."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from era_compile.algorithms import Selection, SelectionInputs, run_strategy
from era_compile.algorithms.btr import assign_clusters, cluster_counts, recycle
from era_compile.algorithms.dep import dep_select, dual_view_similarity, head_distribution, head_entropy
from era_compile.algorithms.dpp import _batched_greedy, greedy_map, greedy_map_sequence
from era_compile.algorithms.saliency import instruction_saliency

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psd_kernel(n: int, rank: int, seed: int, batch=()) -> torch.Tensor:
    feats = torch.randn(*batch, n, rank, generator=gen(seed), dtype=f64)
    return feats @ feats.transpose(-1, -2)


def brute_force_greedy(score_of_set, n: int, k: int) -> list:
    """Greedy by full re-evaluation: add the item that maximises score(Y + {i})."""
    chosen = []
    for _ in range(k):
        best, best_score = None, -math.inf
        for i in range(n):
            if i in chosen:
                continue
            score = score_of_set(chosen + [i])
            if score > best_score:
                best, best_score = i, score
        chosen.append(best)
    return chosen


def logdet(kernel: torch.Tensor, items: list) -> float:
    sign, value = torch.linalg.slogdet(kernel[items][:, items])
    return value.item() if sign > 0 else -math.inf


# --------------------------------------------------------------------------- greedy MAP (section 2.4, test 3)


def test_greedy_map_matches_brute_force_logdet_sequence():
    n, k = 60, 12
    kernel = psd_kernel(n, rank=20, seed=0)
    expected = brute_force_greedy(lambda items: logdet(kernel, items), n, k)
    assert greedy_map_sequence(kernel, k).tolist() == expected
    assert greedy_map(kernel, k).tolist() == sorted(expected)


def test_greedy_map_batched_equals_per_item_and_is_sorted():
    kernels = psd_kernel(40, rank=16, seed=1, batch=(2, 3))
    picks = greedy_map(kernels, 10)
    assert picks.shape == (2, 3, 10) and picks.dtype == torch.int64
    assert bool((picks[..., 1:] > picks[..., :-1]).all())
    for a in range(2):
        for b in range(3):
            expected = brute_force_greedy(functools.partial(logdet, kernels[a, b]), 40, 10)
            assert picks[a, b].tolist() == sorted(expected)


def test_greedy_map_float32_and_edge_budgets():
    kernel = psd_kernel(30, rank=30, seed=2)
    assert greedy_map(kernel.float(), 8).tolist() == greedy_map(kernel, 8).tolist()
    assert greedy_map(kernel, 30).tolist() == list(range(30))  # k == N: everything, sorted
    assert greedy_map(kernel, 0).shape == (0,)
    # Rank-deficient kernel (rank 3 < k): the clamp keeps the result finite and distinct.
    low_rank = greedy_map(psd_kernel(20, rank=3, seed=3), 10)
    assert low_rank.unique().numel() == 10
    with pytest.raises(ValueError):
        greedy_map(kernel, 31)


def test_host_loop_and_batched_torch_loop_pick_alike():
    """CPU runs the host (NumPy) loop, other devices the batched torch loop: same recurrence, same picks."""
    features = torch.randn(3, 60, 20, generator=gen(23), dtype=f64)
    kernel = features @ features.transpose(1, 2)
    rows = lambda j: kernel.gather(1, j.unsqueeze(-1).expand(-1, 1, 60)).squeeze(1)  # noqa: E731
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    assert torch.equal(_batched_greedy(gains, rows, 15), greedy_map_sequence(kernel, 15))
    assert torch.equal(
        _batched_greedy(gains.float(), lambda j: rows(j).float(), 15), greedy_map_sequence(kernel.float(), 15)
    )


def test_host_and_batched_loops_pick_alike_past_the_float32_rank():
    """48 clusters of near-duplicates (D = 64): from the 49th pick on every gain is float32 round-off,
    which the two loops sum in another order; below the pivot floor both go by quality, so alike."""
    n, k = 576, 128
    for seed in range(3):
        g = gen(seed)
        centres = torch.randn(48, 64, generator=g)
        feats = centres.repeat_interleave(12, 0) + 1e-4 * torch.randn(n, 64, generator=g)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        kernel = (feats @ feats.T).unsqueeze(0)
        rows = lambda j, kernel=kernel: kernel.gather(1, j.unsqueeze(-1).expand(-1, 1, n)).squeeze(1)  # noqa: E731
        gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
        host = greedy_map_sequence(kernel, k)
        assert torch.equal(_batched_greedy(gains, rows, k), host)
        assert host[0, :48].div(12, rounding_mode="floor").unique().numel() == 48  # one pick per cluster first


# --------------------------------------------------------------------------- DEP (section 5.2, test 4)


def test_head_entropy_limits():
    b, h, t = 2, 8, 5
    assert torch.allclose(head_entropy(torch.full((b, h, t), 0.3, dtype=f64)), torch.ones(b, t, dtype=f64))
    one_hot = torch.zeros(b, h, t, dtype=f64)
    one_hot[:, 3] = 0.7
    assert torch.equal(head_entropy(one_hot), torch.zeros(b, t, dtype=f64))
    assert torch.equal(head_entropy(torch.rand(b, 1, t)), torch.zeros(b, t))  # H == 1
    assert torch.allclose(head_entropy(torch.zeros(b, h, t)), torch.ones(b, t))  # unattended token: uniform
    two_heads = torch.zeros(1, 4, 1, dtype=f64)
    two_heads[0, :2] = 1.0
    assert head_entropy(two_heads).item() == pytest.approx(0.5, abs=1e-15)  # ln 2 / ln 4


def test_dual_view_similarity_is_unit_diagonal_psd():
    x = torch.randn(2, 30, 16, generator=gen(4), dtype=f64) * 7
    y = head_distribution(torch.rand(2, 8, 30, generator=gen(5), dtype=f64))
    s = dual_view_similarity(x, y, 0.3)
    assert torch.allclose(torch.diagonal(s, dim1=1, dim2=2), torch.ones(2, 30, dtype=f64), atol=1e-14)
    assert torch.linalg.eigvalsh(s).min() > -1e-12
    xn = x / x.norm(dim=-1, keepdim=True)
    assert torch.allclose(dual_view_similarity(x, y, 0.0), xn @ xn.transpose(1, 2), atol=1e-14)


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_entropy_penalised_greedy_matches_brute_force(lam):
    t, k = 40, 10
    x = torch.randn(1, t, 16, generator=gen(6), dtype=f64)
    saliency = torch.rand(1, 8, t, generator=gen(7), dtype=f64) ** 4  # spread of entropies
    anchors, entropy = dep_select(x, saliency, k, lam=lam, beta=0.5)
    s = dual_view_similarity(x, head_distribution(saliency), 0.5)[0]
    e = entropy[0]
    expected = brute_force_greedy(lambda items: logdet(s, items) - 2 * lam * e[items].sum().item(), t, k)
    assert anchors[0].tolist() == sorted(expected)
    assert torch.equal(entropy, head_entropy(saliency))


def test_era_strategy_through_registry():
    b, t, h, k = 2, 48, 6, 12
    hidden = torch.randn(b, t, 32, generator=gen(8))
    saliency = torch.rand(b, h, t, generator=gen(9))
    calls = []

    def saliency_fn():
        calls.append(1)
        return saliency

    inputs = SelectionInputs(hidden=hidden, queries_fn=lambda: torch.randn(b, h, t, 8), saliency_fn=saliency_fn)
    sel = run_strategy("era", inputs, k, {"lam": 1.0, "beta": 0.5, "seed": 0})
    assert isinstance(sel, Selection) and len(calls) == 1
    a = sel.anchors
    assert a.shape == (b, k) and a.dtype == torch.int64
    assert bool((a[:, 1:] > a[:, :-1]).all()) and a.min() >= 0 and a.max() < t
    assert sel.confidence.shape == (b, t)
    assert bool(((sel.confidence >= 0) & (sel.confidence <= 1)).all())
    anchors, entropy = dep_select(hidden, saliency, k, 1.0, 0.5)
    assert torch.equal(a, anchors) and torch.allclose(sel.confidence, 1 - entropy)
    # Defaults (lam 1.0, beta 0.5) apply when the options are absent.
    assert torch.equal(run_strategy("era", inputs, k, {}).anchors, anchors)


# --------------------------------------------------------------------------- BTR (section 5.3, tests 2, 7)


def attention(q, k, v, key_bias=None):
    scores = q @ k.T / math.sqrt(q.shape[-1])
    if key_bias is not None:
        scores = scores + key_bias
    return torch.softmax(scores, dim=-1) @ v


def test_duplicate_merge_with_log_count_bias_is_exact():
    counts = [1, 2, 3, 4, 5, 6, 7, 12]
    dim, d = 24, 16
    distinct = torch.randn(len(counts), dim, generator=gen(10), dtype=f64)
    group = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    group = group[torch.randperm(group.numel(), generator=gen(11))]  # duplicates scattered over the image
    visual = distinct[group]  # [40, dim]
    text = torch.randn(10, dim, generator=gen(12), dtype=f64)
    wq, wk, wv = (torch.randn(dim, d, generator=gen(13 + i), dtype=f64) / math.sqrt(dim) for i in range(3))

    # One anchor per distinct row (its first occurrence); BTR must merge every duplicate into it.
    anchors = torch.tensor(sorted(int((group == g).nonzero()[0]) for g in range(len(counts))))
    x_anchor, log_bias = recycle(visual[None], anchors[None], None)
    merged_counts = cluster_counts(visual[None], anchors[None])[0]
    assert merged_counts.tolist() == [counts[int(group[a])] for a in anchors]
    assert torch.equal(log_bias[0], merged_counts.double().log().float())
    assert torch.allclose(x_anchor[0], visual[anchors], atol=1e-15)

    queries = torch.cat([text, torch.randn(5, dim, generator=gen(20), dtype=f64)]) @ wq
    full = torch.cat([visual, text])
    reference = attention(queries, full @ wk, full @ wv)
    short = torch.cat([x_anchor[0], text])
    phi = torch.cat([merged_counts.double().log(), torch.zeros(10, dtype=f64)])
    rectified = attention(queries, short @ wk, short @ wv, key_bias=phi)
    assert (rectified - reference).abs().max() < 1e-12
    unrectified = attention(queries, short @ wk, short @ wv)
    assert (unrectified - reference).abs().max() > 1e-2  # without the bias the merge is visibly wrong


def test_btr_mean_weights_preserve_visual_mass():
    b, t, k = 2, 576, 32
    x = torch.randn(b, t, 64, generator=gen(21))
    anchors = torch.sort(torch.randperm(t, generator=gen(22))[:k]).values.expand(b, k).contiguous()
    confidence = torch.rand(b, t, generator=gen(23))
    _, log_bias = recycle(x, anchors, confidence, weight_norm="mean")
    assert torch.allclose(log_bias.double().exp().sum(-1), torch.full((b,), float(t), dtype=f64), rtol=1e-6)
    assert cluster_counts(x, anchors).sum(-1).tolist() == [t, t]
    assert bool((log_bias >= 0).all())
    # "none" only shrinks the bias; "max" gives b <= |C|.
    counts = cluster_counts(x, anchors).double()
    _, none_bias = recycle(x, anchors, confidence, weight_norm="none")
    _, max_bias = recycle(x, anchors, confidence, weight_norm="max")
    assert bool((none_bias.double().exp() <= counts + 1e-5).all())
    assert bool((max_bias.double().exp() <= counts + 1e-5).all())
    assert bool((none_bias <= max_bias + 1e-6).all())


UNIFORM_CASES = [
    (c, norm) for norm in ("mean", "none", "max") for c in (None, 0.37, 1.0, 0.0) if not (norm == "none" and c == 0.37)
]  # "none" keeps w = s < 1: not a count


@pytest.mark.parametrize("confidence_value,weight_norm", UNIFORM_CASES)  # 0.0 triggers the guard
def test_btr_uniform_or_guarded_confidence_gives_log_count(confidence_value, weight_norm):
    b, t, k = 2, 100, 9
    x = torch.randn(b, t, 20, generator=gen(24))
    anchors = torch.stack([torch.sort(torch.randperm(t, generator=gen(25 + i))[:k]).values for i in range(b)])
    confidence = None if confidence_value is None else torch.full((b, t), confidence_value)
    _, log_bias = recycle(x, anchors, confidence, weight_norm=weight_norm)
    expected = cluster_counts(x, anchors).double().log().float()
    assert bool(torch.isfinite(log_bias).all())
    assert torch.equal(log_bias, expected)


def loop_recycle(x, anchors, confidence, weight_norm, cosine=True):
    """Reference BTR (section 5.3), one token at a time: centroids and biases b."""
    centroids, biases = [], []
    for sample, picks, conf in zip(x, anchors, confidence, strict=True):
        feats = sample / sample.norm(dim=-1, keepdim=True) if cosine else sample
        members = {int(a): [int(a)] for a in picks}
        for u in range(sample.shape[0]):
            if u in members:
                continue
            sims = [float(feats[u] @ feats[a]) for a in picks]
            members[int(picks[max(range(len(sims)), key=sims.__getitem__)])].append(u)
        pruned = [u for u in range(sample.shape[0]) if u not in members]
        s = {u: float(conf[u]) for u in pruned}
        norm = {"mean": sum(s.values()) / len(s), "max": max(s.values()), "none": 1.0}[weight_norm]
        centroids.append(torch.stack([sample[members[int(a)]].mean(0) for a in picks]))
        biases.append(torch.tensor([1 + sum(s[u] / norm for u in members[int(a)][1:]) for a in picks]))
    return torch.stack(centroids), torch.stack(biases)


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("weight_norm", ["mean", "none", "max"])
def test_btr_matches_loop_reference(cosine, weight_norm):
    b, t, k = 2, 50, 7
    x = torch.randn(b, t, 12, generator=gen(30), dtype=f64) * torch.rand(b, t, 1, generator=gen(31), dtype=f64) * 3
    anchors = torch.stack([torch.sort(torch.randperm(t, generator=gen(32 + i))[:k]).values for i in range(b)])
    confidence = torch.rand(b, t, generator=gen(34))
    x_anchor, log_bias = recycle(x, anchors, confidence, cosine=cosine, weight_norm=weight_norm)
    ref_centroids, ref_bias = loop_recycle(x, anchors, confidence, weight_norm, cosine)
    assert x_anchor.dtype == f64
    assert torch.allclose(x_anchor, ref_centroids, atol=1e-14)  # unweighted mean of the cluster
    assert torch.allclose(log_bias.double(), ref_bias.double().log(), atol=1e-6)
    slots = assign_clusters(x, anchors, cosine)
    assert torch.equal(slots.gather(1, anchors), torch.arange(k).expand(b, k))  # anchors head their own cluster


def test_btr_without_merge_and_without_pruned_tokens():
    b, t, k = 2, 30, 6
    x = torch.randn(b, t, 8, generator=gen(35)).to(torch.bfloat16)
    anchors = torch.stack([torch.sort(torch.randperm(t, generator=gen(36 + i))[:k]).values for i in range(b)])
    x_anchor, log_bias = recycle(x, anchors, torch.rand(b, t), merge=False)
    assert torch.equal(x_anchor, x.gather(1, anchors[..., None].expand(b, k, 8)))
    assert log_bias.dtype == torch.float32 and torch.equal(log_bias, torch.zeros(b, k))
    everything = torch.arange(t).expand(b, t).contiguous()
    x_all, bias_all = recycle(x, everything, torch.rand(b, t))
    assert torch.equal(x_all, x) and torch.equal(bias_all, torch.zeros(b, t))
    x_merged, _ = recycle(x, anchors, None)
    assert x_merged.dtype == torch.bfloat16 and x_merged.shape == (b, k, 8)
    with pytest.raises(ValueError):
        recycle(x, anchors, None, weight_norm="sum")


# --------------------------------------------------------------------------- Jensen gap (section 7, test 8)


def test_count_bias_underestimates_cluster_mass():
    d, dim = 16, 32
    wk = torch.randn(dim, d, generator=gen(40), dtype=f64) / math.sqrt(dim)
    for trial in range(20):
        size = 2 + trial % 9
        centre = torch.randn(dim, generator=gen(41 + trial), dtype=f64)
        cluster = centre + 0.5 * torch.randn(size, dim, generator=gen(100 + trial), dtype=f64)
        keys = cluster @ wk
        q = 2 * torch.randn(8, d, generator=gen(200 + trial), dtype=f64)
        logits = q @ keys.T / math.sqrt(d)
        true_mass = logits.exp().sum(-1)
        count_bias_mass = size * (q @ keys.mean(0) / math.sqrt(d)).exp()
        ratio = true_mass / count_bias_mass
        assert bool((ratio >= 1 - 1e-12).all()) and bool((ratio > 1).any())


# --------------------------------------------------------------------------- saliency (section 1.3, test 9)


def reference_saliency(q, k, visual_mask, mask_bias, rows_per_sample, scale):
    """Eager attention: the full [B, H, N, N] softmax, then rows I and visual columns."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)  # HF repeat_kv: query head h reads kv head h // group
    probs = torch.softmax(q @ kk.transpose(-1, -2) * scale + mask_bias, dim=-1)
    out = []
    for i, rows in enumerate(rows_per_sample):
        out.append(probs[i][:, rows].mean(dim=1)[:, visual_mask[i]])
    return torch.stack(out)


def causal_bias(n):
    return torch.full((n, n), -math.inf, dtype=f64).triu(1)


def qk(b, hq, hkv, n, d, seed):
    return (
        torch.randn(b, hq, n, d, generator=gen(seed), dtype=f64),
        torch.randn(b, hkv, n, d, generator=gen(seed + 1), dtype=f64),
    )


def span_mask(b, n, starts, t):
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, s in enumerate(starts):
        mask[i, s : s + t] = True
    return mask


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_instruction_saliency_matches_eager_attention_causal(hq, hkv):
    b, n, d, t = 2, 40, 16, 12
    q, k = qk(b, hq, hkv, n, d, seed=50)
    visual = span_mask(b, n, [5, 9], t)
    scale = d**-0.5
    got = instruction_saliency(q, k, visual, attn_mask=None, is_causal=True, scale=scale, num_visual=t)
    rows = [list(range(17, n)), list(range(21, n))]
    expected = reference_saliency(q, k, visual, causal_bias(n), rows, scale)
    assert got.dtype == torch.float32 and got.shape == (b, hq, t)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-9)
    # A different layout of the visual tokens (not one span) still reads position order.
    scattered = torch.zeros(b, n, dtype=torch.bool)
    scattered[:, [3, 7, 8, 15, 20, 30]] = True
    got = instruction_saliency(q, k, scattered, attn_mask=None, is_causal=True, scale=scale, num_visual=6)
    expected = reference_saliency(q, k, scattered, causal_bias(n), [list(range(31, n))] * 2, scale)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("as_float", [False, True])
def test_instruction_saliency_left_padding_mask(as_float):
    b, hq, hkv, n, d, t = 2, 8, 2, 36, 8, 10
    q, k = qk(b, hq, hkv, n, d, seed=60)
    pad = 6  # sample 1 is left-padded: its first 6 positions are padding
    real = torch.ones(b, n, dtype=torch.bool)
    real[1, :pad] = False
    visual = span_mask(b, n, [4, 4 + pad], t)
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & real[:, None, None, :]  # [B, 1, N, N], HF style
    attn_mask = allowed
    if as_float:
        attn_mask = torch.zeros(allowed.shape, dtype=f64).masked_fill(~allowed, torch.finfo(f64).min)
    scale = 0.3
    got = instruction_saliency(q, k, visual, attn_mask=attn_mask, is_causal=False, scale=scale, num_visual=t)
    bias = torch.zeros(allowed.shape, dtype=f64).masked_fill(~allowed, -math.inf)
    # Sample 1's padding rows are fully masked (NaN in eager); they lie before the image and are not in I.
    rows = [list(range(14, n)), list(range(14 + pad, n))]
    expected = reference_saliency(q, k, visual, bias, rows, scale)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("as_float", [False, True])
def test_instruction_saliency_right_padding_and_causal_plus_mask(as_float):
    b, hq, hkv, n, d, t = 2, 4, 1, 30, 8, 8
    q, k = qk(b, hq, hkv, n, d, seed=70)
    real = torch.ones(b, n, dtype=torch.bool)
    real[0, 24:] = False  # right padding: HF masks the padding keys only
    visual = span_mask(b, n, [3, 3], t)
    key_padding = real[:, None, None, :]  # [B, 1, 1, N]: broadcast over heads and queries
    attn_mask = key_padding
    if as_float:  # HF's additive form: the dtype's most negative value, not -inf
        attn_mask = torch.zeros(key_padding.shape, dtype=torch.float32).masked_fill(
            ~key_padding, torch.finfo(torch.float32).min
        )
    got = instruction_saliency(q, k, visual, attn_mask=attn_mask, is_causal=True, scale=0.25, num_visual=t)
    bias = causal_bias(n) + torch.zeros(b, 1, 1, n, dtype=f64).masked_fill(~key_padding, -math.inf)
    rows = [list(range(11, 24)), list(range(11, n))]  # sample 0's padding queries are excluded
    expected = reference_saliency(q, k, visual, bias, rows, 0.25)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-9)


def test_instruction_saliency_image_last_uses_last_row():
    b, hq, hkv, n, d, t = 2, 4, 2, 20, 8, 6
    q, k = qk(b, hq, hkv, n, d, seed=80)
    visual = span_mask(b, n, [n - t, 5], t)  # sample 0 has no text after the image
    got = instruction_saliency(q, k, visual, attn_mask=None, is_causal=True, scale=0.35, num_visual=t)
    expected = reference_saliency(q, k, visual, causal_bias(n), [[n - 1], list(range(11, n))], 0.35)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-9)


def test_instruction_saliency_chunked_rows_and_float32_inputs(monkeypatch):
    import era_compile.algorithms.saliency as saliency_module

    b, hq, hkv, n, d, t = 1, 4, 4, 50, 8, 10
    q, k = qk(b, hq, hkv, n, d, seed=90)
    visual = span_mask(b, n, [2], t)
    whole = instruction_saliency(q, k, visual, attn_mask=None, is_causal=True, scale=0.3, num_visual=t)
    monkeypatch.setattr(saliency_module, "MAX_CHUNK_ELEMENTS", hq * n * 3)  # 3 query rows per chunk
    chunked = instruction_saliency(q, k, visual, attn_mask=None, is_causal=True, scale=0.3, num_visual=t)
    assert torch.allclose(chunked, whole, rtol=1e-6)
    single = instruction_saliency(q.float(), k.float(), visual, attn_mask=None, is_causal=True, scale=0.3, num_visual=t)
    assert torch.allclose(single, whole, rtol=1e-4, atol=1e-7)


def test_instruction_saliency_rejects_bad_inputs():
    q, k = qk(1, 6, 4, 10, 8, seed=95)
    visual = span_mask(1, 10, [2], 4)
    with pytest.raises(ValueError, match="multiple"):
        instruction_saliency(q, k, visual, attn_mask=None, is_causal=True, scale=1.0, num_visual=4)
    q, k = qk(1, 4, 2, 10, 8, seed=96)
    with pytest.raises(ValueError, match="num_visual"):
        instruction_saliency(q, k, visual, attn_mask=None, is_causal=True, scale=1.0, num_visual=5)
    with pytest.raises(ValueError, match="attn_mask"):
        instruction_saliency(
            q, k, visual, attn_mask=torch.ones(1, 1, 9, 10, dtype=torch.bool), is_causal=False, scale=1.0, num_visual=4
        )


def test_picks_past_the_numerical_rank_stay_distinct_and_finite_in_float32():
    """A float32 kernel of rank 4 asked for 40 picks: once no gain is measurable the rest go by
    quality (L_ii); dividing by the floored pivot once blew the factor up to overflow and repeated picks."""
    features = torch.randn(2, 60, 4, generator=gen(31)) * torch.rand(2, 60, 1, generator=gen(32)) * 30
    kernel = features @ features.transpose(1, 2)
    host = greedy_map_sequence(kernel, 40)
    rows = lambda j: kernel.gather(1, j.unsqueeze(-1).expand(-1, 1, 60)).squeeze(1)  # noqa: E731
    batched = _batched_greedy(torch.diagonal(kernel, dim1=1, dim2=2).clone(), rows, 40)
    for picks in (host, batched):
        assert all(row.unique().numel() == 40 for row in picks)
    assert torch.equal(host[:, :4], batched[:, :4])  # within the rank both loops agree


@pytest.mark.parametrize("d", [64, 128, 256])
def test_entropyprune_pools_heads_wider_than_128_channels(d):
    """ALGORITHMS.md §3.2, as the released code does it: a head dim above 128 (Gemma's 256) is
    mean-pooled to 128 channels before the head Gram; 128 and below are scored as they are. The
    expected scores are written out here from the formula, without the module's helpers."""
    from era_compile.algorithms.entropyprune import entropyprune_scores

    g = torch.Generator().manual_seed(d)
    B, H, T = 2, 16, 24
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)

    def by_hand(m):  # m [B, H, T, c] -> scores [B, T]
        m = m.transpose(1, 2)
        r = m - m.mean(dim=-2, keepdim=True)
        rho = torch.linalg.eigvalsh(r @ r.transpose(-1, -2) / H).clamp_min(1e-10)
        return -(rho * rho.log()).sum(-1) / math.log(H)

    pooled = q.reshape(B, H, T, 128, d // 128).mean(-1) if d > 128 else q
    got = entropyprune_scores(q)
    assert torch.allclose(got, by_hand(pooled), atol=1e-12, rtol=0)
    if d > 128:  # the pooling matters: unpooled scores rank the tokens otherwise
        assert not torch.equal(got.argsort(-1), by_hand(q).argsort(-1))


# --------------------------------------------------------------------------- budget rule (section 2.2, project)
# k = max(1, min(T, round(ratio * T))) with Python's round (halves to even), or max(1, min(keep_tokens, T));
# no visual token, nothing kept. The expected counts are written out by hand, not computed by the rule.


@pytest.mark.parametrize(
    "T, ratio, k",
    [
        (36, 0.3, 11),  # 10.8: to the nearest, up (rounding down would give 10)
        (36, 0.11, 4),  # 3.96: up (down: 3)
        (36, 0.2, 7),  # 7.2: down
        (36, 0.125, 4),  # 4.5 exactly: a half goes to the even neighbour, down
        (36, 0.375, 14),  # 13.5 exactly: a half goes to the even neighbour, up (floor: 13)
        (8, 0.3125, 2),  # 2.5 exactly: even, down (half-up would give 3)
        (36, 0.01, 1),  # 0.36 rounds to 0: the floor keeps one
        (576, 1e-6, 1),  # 0.000576: the floor keeps one
        (36, 1.0, 36),
    ],
)
def test_kept_count_of_a_ratio_rounds_to_nearest_even_and_keeps_at_least_one(T, ratio, k):
    from era_compile import ERAConfig
    from era_compile.algorithms import kept_count

    assert kept_count(T, keep_ratio=ratio) == k
    assert ERAConfig(keep_ratio=ratio).kept(T) == k


@pytest.mark.parametrize(
    "T, tokens, k", [(36, 50, 36), (36, 37, 36), (36, 36, 36), (36, 8, 8), (36, 1, 1), (5, 1000, 5)]
)
def test_kept_count_of_keep_tokens_is_capped_at_the_visual_tokens(T, tokens, k):
    from era_compile import ERAConfig
    from era_compile.algorithms import kept_count

    assert kept_count(T, keep_tokens=tokens) == k
    assert ERAConfig(keep_tokens=tokens).kept(T) == k


def test_kept_count_of_a_sample_without_visual_tokens_is_zero():
    from era_compile.algorithms import kept_count

    assert kept_count(0, keep_ratio=0.3) == 0 and kept_count(0, keep_tokens=5) == 0
