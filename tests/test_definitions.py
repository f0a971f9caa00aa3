"""Each strategy and the sequence assembly against its definition, written out here.

The compiled-vs-reference checks elsewhere share the algorithm functions with what they test:
a mistake inside a strategy (keeping the lowest scores, say) would move both sides alike. Here
every expected answer comes from the definition in ALGORITHMS.md, coded again in the plainest
form (loops over tokens, brute-force log-determinants), with none of the project's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from era_compile.algorithms import SelectionInputs, run_strategy
from era_compile.algorithms.sequence import assemble
from era_compile.ops.prune import selection_inputs

OPTIONS = {"lam": 1.0, "beta": 0.5, "seed": 0, "trace_normalize": False}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(hidden=None, saliency=None, queries=None):
    return SelectionInputs(hidden=hidden, queries_fn=lambda: queries, saliency_fn=lambda: saliency)


def _top_k(scores, k):
    """Indices of the k largest scores, ascending: sort by score, take k, sort by index."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return sorted(order[:k])


# --------------------------------------------------------------------------- EntropyPrune (§3.2)


def _entropyprune_definition(queries, k, trace_normalize=False):
    """Per token: M = its query in every head [H, d]; R = M - head mean; A = R Rᵀ / H;
    ρ = eig(A) clamped to 1e-10 (divided by its sum if trace_normalize); s = -Σ ρ ln ρ / ln H."""
    B, H, T, _ = queries.shape
    anchors = []
    for b in range(B):
        scores = []
        for t in range(T):
            m = queries[b, :, t, :].double()
            r = m - m.mean(0, keepdim=True)
            rho = torch.linalg.eigvalsh(r @ r.T / H).clamp_min(1e-10)
            if trace_normalize:
                rho = rho / rho.sum()
            scores.append(float(-(rho * rho.log()).sum() / math.log(H)))
        anchors.append(_top_k(scores, k))
    return torch.tensor(anchors)


@pytest.mark.parametrize("trace_normalize", [False, True])
def test_entropyprune_keeps_the_largest_matrix_entropies(trace_normalize):
    queries = torch.randn(2, 6, 20, 16, generator=_gen(0)) * torch.rand(1, 1, 20, 1, generator=_gen(1)) * 3
    sel = run_strategy(
        "entropyprune",
        _inputs(hidden=torch.zeros(2, 20, 4), queries=queries),
        7,
        dict(OPTIONS, trace_normalize=trace_normalize),
    )
    assert torch.equal(sel.anchors, _entropyprune_definition(queries, 7, trace_normalize))


# --------------------------------------------------------------------------- FastV (§6.2)


def test_fastv_keeps_what_the_last_prompt_token_attends_to_most():
    """Through the op's own input builder: softmax of the last query over all keys (causal: it sees
    every key), per query head with its KV head (GQA), visual columns, head mean, top-k."""
    B, H, Hkv, N, d, T = 2, 4, 2, 14, 8, 6
    q = torch.randn(B, H, N, d, generator=_gen(2)) * 2
    k = torch.randn(B, Hkv, N, d, generator=_gen(3)) * 2
    hidden = torch.randn(B, N, 16, generator=_gen(4))
    visual = torch.zeros(B, N, dtype=torch.bool)
    visual[0, 2:8] = True
    visual[1, 5:11] = True
    scale = 1 / math.sqrt(d)
    expected = []
    for b in range(B):
        positions = [i for i in range(N) if visual[b, i]]
        mean = [0.0] * T
        for h in range(H):
            logits = [float(q[b, h, -1] @ k[b, h * Hkv // H, j]) * scale for j in range(N)]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            for t, j in enumerate(positions):
                mean[t] += weights[j] / sum(weights) / H
        expected.append(_top_k(mean, 3))
    inputs = selection_inputs(hidden, visual, q, k, None, True, scale, T)
    assert torch.equal(run_strategy("fastv", inputs, 3, OPTIONS).anchors, torch.tensor(expected))


# --------------------------------------------------------------------------- DivPrune (§6.2)


def _divprune_definition(x, k):
    """Cosine distance; first the token whose nearest other token is farthest, then repeatedly the
    unchosen token whose nearest chosen token is farthest (lower index on ties)."""
    anchors = []
    for sample in x:
        T = sample.shape[0]
        unit = [row / row.norm() for row in sample.double()]
        dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(T)] for i in range(T)]
        isolation = [min(dist[i][j] for j in range(T) if j != i) for i in range(T)]
        chosen = [max(range(T), key=lambda i: (isolation[i], -i))]
        while len(chosen) < k:
            rest = [i for i in range(T) if i not in chosen]
            chosen.append(max(rest, key=lambda i: (min(dist[i][c] for c in chosen), -i)))
        anchors.append(sorted(chosen))
    return torch.tensor(anchors)


def test_divprune_is_greedy_max_min_diversity():
    x = torch.randn(2, 18, 12, generator=_gen(5), dtype=torch.float64)
    sel = run_strategy("divprune", _inputs(hidden=x), 6, OPTIONS)
    assert torch.equal(sel.anchors, _divprune_definition(x, 6))


# --------------------------------------------------------------------------- ERA / DEP (§5.2, §5.6)


def _dep_definition(x, saliency, k, lam, beta):
    """Y = saliency normalised over heads per token; ê = -Σ y ln y / ln H; S = (1-β) cos(X) + β cos(Y);
    q = exp(-λ ê); greedily add the token that maximises log det of (q S q) on the chosen set."""
    anchors, entropies = [], []
    for b in range(x.shape[0]):
        a = saliency[b].double().T  # [T, H]
        y = a / a.sum(-1, keepdim=True)
        H = y.shape[1]
        e = -(y * y.clamp_min(1e-12).log()).sum(-1) / math.log(H)
        xn = x[b].double() / x[b].double().norm(dim=-1, keepdim=True)
        yn = y / y.norm(dim=-1, keepdim=True)
        S = (1 - beta) * xn @ xn.T + beta * yn @ yn.T
        q = torch.exp(-lam * e)
        L = q[:, None] * S * q[None, :]
        chosen = []
        for _ in range(k):
            gains = {
                i: float(torch.linalg.slogdet(L[chosen + [i]][:, chosen + [i]])[1])
                for i in range(L.shape[0])
                if i not in chosen
            }
            chosen.append(max(gains, key=gains.get))
        anchors.append(sorted(chosen))
        entropies.append(e)
    return torch.tensor(anchors), torch.stack(entropies)


@pytest.mark.parametrize("lam,beta", [(1.0, 0.5), (3.0, 0.2), (0.0, 1.0)])
def test_era_is_entropy_penalised_greedy_log_det_over_the_dual_view(lam, beta):
    x = torch.randn(2, 16, 10, generator=_gen(6), dtype=torch.float64)
    saliency = torch.rand(2, 5, 16, generator=_gen(7), dtype=torch.float64) ** 3 + 1e-3
    sel = run_strategy("era", _inputs(hidden=x, saliency=saliency), 5, dict(OPTIONS, lam=lam, beta=beta))
    anchors, entropy = _dep_definition(x, saliency, 5, lam, beta)
    assert torch.equal(sel.anchors, anchors)
    assert torch.allclose(sel.confidence, 1 - entropy, atol=1e-12)  # BTR's confidence: 1 - ê


# --------------------------------------------------------------------------- random


def test_random_is_a_seeded_uniform_choice():
    T, k, seeds = 12, 4, 600
    x = torch.zeros(1, T, 4)
    draws = [run_strategy("random", _inputs(hidden=x), k, dict(OPTIONS, seed=s)).anchors[0] for s in range(seeds)]
    assert torch.equal(draws[0], run_strategy("random", _inputs(hidden=x), k, OPTIONS).anchors[0])  # seeded
    assert len({tuple(d.tolist()) for d in draws}) > seeds // 2  # the seed matters
    counts = torch.zeros(T)
    for d in draws:
        assert len(set(d.tolist())) == k and int(d.min()) >= 0 and int(d.max()) < T
        counts[d] += 1
    expected, sd = seeds * k / T, math.sqrt(seeds * (k / T) * (1 - k / T))
    assert ((counts - expected).abs() < 5 * sd).all(), counts  # every token as likely as any other


# --------------------------------------------------------------------------- sequence assembly (§2.3)


def test_assemble_keeps_text_puts_recycled_anchors_at_their_rows_and_biases_only_them():
    """Text before and after the image (at other offsets in each sample); the kept sequence is the
    text and the anchors at their original positions, in order; each anchor's row holds its
    recycled state and its log bias, every other row its own state and bias 0."""
    B, N, D = 2, 11, 3
    hidden = torch.randn(B, N, D, generator=_gen(8))
    visual = torch.zeros(B, N, dtype=torch.bool)
    visual[0, 2:7] = True  # text 0-1, image 2-6, text 7-10
    visual[1, 4:9] = True  # text 0-3, image 4-8, text 9-10
    visual_pos = torch.stack([torch.nonzero(v).flatten() for v in visual])
    anchors = torch.tensor([[1, 4], [0, 2]])
    states = torch.randn(B, 2, D, generator=_gen(9))
    log_bias = torch.tensor([[0.5, 1.25], [0.75, 2.0]])
    keep, kept, bias = assemble(hidden, visual, visual_pos, anchors, states, log_bias)
    for b in range(B):
        anchor_at = {int(visual_pos[b, a]): i for i, a in enumerate(anchors[b])}
        expected_positions = [p for p in range(N) if not visual[b, p] or p in anchor_at]
        assert keep[b].tolist() == expected_positions
        for row, p in enumerate(expected_positions):
            if p in anchor_at:
                assert torch.equal(kept[b, row], states[b, anchor_at[p]])
                assert float(bias[b, row]) == float(log_bias[b, anchor_at[p]])
            else:
                assert torch.equal(kept[b, row], hidden[b, p])
                assert float(bias[b, row]) == 0.0
    assert int((bias != 0).sum()) == 4
