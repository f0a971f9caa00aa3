"""Every era:: op passes torch.library.opcheck: schema, fake kernel, dispatch, and outputs that are
a function of the inputs (no op reads global or context state). A new op without a sample here fails."""

from __future__ import annotations

import json

import pytest
import torch

import era_compile.ops  # noqa: F401  (registers the ops)
from era_compile.ops.prune import budget_tensor


def _registered_ops():
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("era::"))


def _prefill(B=2, N=12, T=6, D=16, H=4, Hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, 3:3 + T] = True
    return (torch.randn(B, N, D, generator=g), mask, torch.randn(B, H, N, d, generator=g),
            torch.randn(B, Hkv, N, d, generator=g))


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
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    return q, k, v, torch.randn(2, 7, generator=g), None, True, None, "sdpa"


def _unprune_args():
    hidden = _recycle_args()[0]
    keep_index, hidden_kept, log_bias, _ = torch.ops.era.recycle(*_recycle_args())
    return hidden, keep_index, hidden_kept, log_bias, True


SAMPLES = {
    "select": _select_args,
    "recycle": _recycle_args,
    "unprune": _unprune_args,
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
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    hidden, mask, q, k = _prefill(seed=3)
    c = torch.ops.era.select(hidden, mask, q, k, *_select_args()[4:])
    assert not torch.equal(a[0], c[0]) and int(a[0].sum()) == int(c[0].sum()) == 2 * 3  # 3 anchors a sample
    r1, r2 = torch.ops.era.recycle(*_recycle_args()), torch.ops.era.recycle(*_recycle_args())
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    assert r1[1].shape[1] == 12 - 6 + 3 and r1[3].tolist() == [[6, 3], [6, 3]]  # n' and [T_b, k_b]: the data's


@pytest.mark.parametrize("rectify", [True, False])
def test_unprune_writes_the_kept_states_back_and_masks_the_pruned_keys(rectify):
    """A split decoder's sequence keeps its length: the kept (recycled) states at their positions,
    the pruned ones as they were, and a key bias that is LAR's at the kept keys (0 without it)
    and BLOCKED at the pruned ones. A ragged batch's padding slot (position 0, BLOCKED) writes
    nothing over the real token at position 0."""
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
