"""Every era:: op passes torch.library.opcheck: schema, fake kernel, dispatch, and outputs that are
a function of the inputs (no op reads global or context state). A new op without a sample here fails."""

from __future__ import annotations

import json
import math

import pytest
import torch

import era_compile.ops  # noqa: F401  (registers the ops)
from era_compile.ops.prune import budget_tensor, without_lar


def _registered_ops():
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("era::"))


def _prefill(B=2, N=12, T=6, D=16, H=4, Hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, 3 : 3 + T] = True
    return (
        torch.randn(B, N, D, generator=g),
        mask,
        torch.randn(B, H, N, d, generator=g),
        torch.randn(B, Hkv, N, d, generator=g),
    )


OPTIONS = json.dumps({"lam": 1.0, "beta": 0.5, "seed": 0, "trace_normalize": False})


def _select_args():
    hidden, mask, q, k = _prefill()
    return (hidden, mask, q, k, None, True, 0.35, budget_tensor(0.5, None), "era", OPTIONS)


def _recycle_args():
    hidden, mask, _, _ = _prefill()
    anchor_mask = torch.zeros_like(mask)
    anchor_mask[0, [3, 5, 8]] = anchor_mask[1, [4, 6, 7]] = True  # 3 of the 6 visual positions 3..8
    confidence = torch.rand(2, 12, generator=torch.Generator().manual_seed(1))
    return hidden, mask, anchor_mask, confidence, True, "mean"  # 12 - 6 + 3 kept: the op's own count


def _attention_args():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 5, 8, generator=g),
        torch.randn(2, 2, 7, 8, generator=g),
        torch.randn(2, 2, 7, 8, generator=g),
    )
    return q, k, v, torch.randn(2, 7, generator=g), None, True, None, "sdpa"


def _unprune_args():
    hidden = _recycle_args()[0]
    keep_index, hidden_kept, log_bias, _ = torch.ops.era.recycle(*_recycle_args())
    return hidden, keep_index, hidden_kept, log_bias, True


def _kept_tokens_args():
    _, key_bias = torch.ops.era.unprune(*_unprune_args())
    return (key_bias,)


SAMPLES = {
    "select": _select_args,
    "recycle": _recycle_args,
    "unprune": _unprune_args,
    "kept_tokens": _kept_tokens_args,
    "biased_attention": _attention_args,
    "head_gram_eigvalsh": lambda: (torch.randn(5, 4, 8),),
}


def test_every_registered_op_has_a_sample():
    assert _registered_ops() == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.era, name).default, SAMPLES[name]())


def test_select_and_recycle_are_functions_of_their_inputs():
    """Twice the same inputs, the same outputs; other inputs, other anchors (not a constant)."""
    a = torch.ops.era.select(*_select_args())
    b = torch.ops.era.select(*_select_args())
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    hidden, mask, q, k = _prefill(seed=3)
    c = torch.ops.era.select(hidden, mask, q, k, *_select_args()[4:])
    assert not torch.equal(a[0], c[0]) and int(a[0].sum()) == int(c[0].sum()) == 2 * 3  # 3 anchors a sample
    r1, r2 = torch.ops.era.recycle(*_recycle_args()), torch.ops.era.recycle(*_recycle_args())
    assert all(torch.equal(x, y) for x, y in zip(r1, r2, strict=True))
    assert r1[1].shape[1] == 12 - 6 + 3 and r1[3].tolist() == [[6, 3], [6, 3]]  # n' and [T_b, k_b]: the data's


@pytest.mark.parametrize("rectify", [True, False])
def test_unprune_writes_the_kept_states_back_and_says_what_was_kept(rectify):
    """A split decoder's layer hands the loop the prompt's length: the kept (recycled) states at
    their positions, the pruned ones as they were, and a key bias that is LAR's at the kept keys (0
    without it) and BLOCKED at the pruned ones. A ragged batch's padding slot (position 0, BLOCKED)
    writes nothing over the real token at position 0. ``era::kept_tokens`` reads recycle's layout
    back off the key bias, slot for slot (the padding slot included), for the later layers."""
    from era_compile.algorithms.sequence import BLOCKED

    hidden, mask, anchor_mask, confidence, _, _ = _recycle_args()
    mask[1, 8] = False  # sample 1 holds 5 visual tokens, so keeps one more: sample 0 is padded by one slot
    keep_index, kept, log_bias, _ = torch.ops.era.recycle(hidden, mask, anchor_mask, confidence, True, "mean")
    assert log_bias[0, 0] == BLOCKED and keep_index[0, 0] == 0 and keep_index[0, 1] == 0  # the slot; position 0
    full, key_bias = torch.ops.era.unprune(hidden, keep_index, kept, log_bias, rectify)
    for b in range(2):
        real = log_bias[b] > BLOCKED
        positions = keep_index[b][real]
        assert torch.equal(full[b, positions], kept[b][real])
        pruned = torch.ones(12, dtype=torch.bool)
        pruned[positions] = False
        assert torch.equal(full[b, pruned], hidden[b, pruned]) and bool((key_bias[b, pruned] == BLOCKED).all())
        assert torch.equal(key_bias[b, positions], log_bias[b][real] if rectify else torch.zeros(len(positions)))
    assert bool((log_bias[0] > 0).any())  # the anchors carry a bias: the rectified case is no zero test
    again, bias_again = torch.ops.era.kept_tokens(key_bias)
    assert torch.equal(again, keep_index)
    assert torch.equal(bias_again, log_bias if rectify else without_lar(log_bias))


def _known_confidence(inputs, k, options):
    """A strategy whose picks and confidence are plain functions of the hidden states: anchors, the k
    largest first features; confidence, the sigmoid of the second feature (every visual token)."""
    from era_compile.algorithms import Selection, top_k_ascending

    hidden = inputs.hidden
    return Selection(anchors=top_k_ascending(hidden[..., 0], k), confidence=torch.sigmoid(hidden[..., 1]))


def _select_with_known_confidence(keep_tokens=2, seed=0):
    from era_compile.algorithms import register_strategy

    register_strategy("test_known_confidence", _known_confidence, overwrite=True)
    hidden, mask, q, k = _prefill(seed=seed)
    anchor_mask, confidence = torch.ops.era.select(
        hidden, mask, q, k, None, True, 0.35, budget_tensor(None, keep_tokens), "test_known_confidence", OPTIONS
    )
    return hidden, mask, anchor_mask, confidence


def test_select_gives_the_strategys_confidence_at_every_visual_token_not_only_the_anchors():
    """era::select's confidence [B, N] is the strategy's at every visual position (the pruned ones
    too: BTR weighs the pruned tokens by it) and 1 at every text position."""
    hidden, mask, anchor_mask, confidence = _select_with_known_confidence()
    expected = torch.ones(2, 12)
    expected[:, 3:9] = torch.sigmoid(hidden[:, 3:9, 1])  # the visual span of ``_prefill``: positions 3..8
    assert torch.allclose(confidence, expected, atol=1e-7, rtol=0)
    pruned = mask & ~anchor_mask
    assert int(pruned.sum()) == 2 * 4 and bool((confidence[pruned] != 1).all())  # the pruned ones are no default


def test_select_then_recycle_weighs_each_pruned_token_by_its_own_confidence():
    """era::select + era::recycle equal BTR written out here (ALGORITHMS.md 5.3, wnorm=mean): a pruned
    token u joins the anchor of highest cosine, w_u = s_u / mean_U s with s_u the strategy's
    confidence of u, b_a = 1 + sum of w_u over the cluster, log_bias = log b_a at the anchor's slot,
    and the anchor's state is the unweighted mean of its cluster; text is kept as it is."""
    hidden, mask, anchor_mask, confidence = _select_with_known_confidence()
    keep_index, hidden_kept, log_bias, samples = torch.ops.era.recycle(
        hidden, mask, anchor_mask, confidence, True, "mean"
    )
    assert samples.tolist() == [[6, 2], [6, 2]]
    for b in range(2):
        visual = list(range(3, 9))
        anchors = sorted(visual, key=lambda p: -hidden[b, p, 0].item())[:2]
        anchors.sort()
        pruned = [p for p in visual if p not in anchors]
        s = {p: torch.sigmoid(hidden[b, p, 1]).item() for p in pruned}
        mean_s = sum(s.values()) / len(s)
        cluster = {a: [a] for a in anchors}
        mass = {a: 1.0 for a in anchors}
        for u in pruned:
            cos = [torch.nn.functional.cosine_similarity(hidden[b, u], hidden[b, a], dim=0).item() for a in anchors]
            a = anchors[max(range(len(anchors)), key=cos.__getitem__)]
            cluster[a].append(u)
            mass[a] += s[u] / mean_s
        assert keep_index[b].tolist() == [0, 1, 2] + anchors + [9, 10, 11]
        for slot, p in enumerate(keep_index[b].tolist()):
            if p in anchors:
                assert abs(log_bias[b, slot].item() - math.log(mass[p])) < 1e-5
                assert torch.allclose(hidden_kept[b, slot], hidden[b, cluster[p]].mean(0), atol=1e-6)
            else:
                assert log_bias[b, slot].item() == 0.0 and torch.equal(hidden_kept[b, slot], hidden[b, p])
        counts = [len(cluster[a]) for a in anchors]
        # teeth: the confidence moves the bias away from the plain log count (all pruned tokens weighing 1)
        assert max(abs(math.log(mass[a]) - math.log(c)) for a, c in zip(anchors, counts, strict=True)) > 1e-2


@pytest.mark.parametrize(
    "budget, kept", [((0.3, None), 11), ((0.375, None), 14), ((0.01, None), 1), ((None, 50), 36), ((None, 36), 36)]
)
def test_select_keeps_the_budget_rules_count(budget, kept):
    """era::select keeps k of T = 36 visual tokens as the rule says (ALGORITHMS.md 2.2): round to
    nearest (halves to even), at least one, keep_tokens capped at T. Counts written by hand."""
    B, N, T = 1, 40, 36
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, 2 : 2 + T] = True
    hidden = torch.randn(B, N, 16, generator=g)
    q, k = torch.randn(B, 4, N, 8, generator=g), torch.randn(B, 2, N, 8, generator=g)
    anchor_mask, _ = torch.ops.era.select(hidden, mask, q, k, None, True, 0.35, budget_tensor(*budget), "era", OPTIONS)
    assert int(anchor_mask.sum()) == kept and not bool((anchor_mask & ~mask).any())


def test_a_cut_that_would_leave_one_token_says_how_to_keep_two():
    """n' is at least 2 to the compiled graph (``MIN_KEPT``): a prompt that is an image alone, one token
    of it kept, is an error that names what to change, not a failed assertion inside the graph."""
    hidden = torch.randn(1, 4, 8)
    visual = torch.ones(1, 4, dtype=torch.bool)
    anchors = torch.tensor([[True, False, False, False]])
    with pytest.raises(ValueError, match="keep at least 2"):
        torch.ops.era.recycle(hidden, visual, anchors, torch.ones(1, 4), True, "mean")
    two = torch.tensor([[True, False, True, False]])
    assert torch.ops.era.recycle(hidden, visual, two, torch.ones(1, 4), True, "mean")[0].shape == (1, 2)
