"""Sequence surgery: from the chosen anchors to the pruned sequence (ALGORITHMS.md section 2.3).

Shapes stay static: ``T`` visual tokens per sample and ``k`` anchors give ``n' = N - T + k``
kept positions per sample, found with a stable sort instead of ``nonzero``. In a ragged batch
(samples with different T) each sample's kept sequence is left-padded to the longest one with
slots that hold no token: position 0, zero state, a ``BLOCKED`` bias (no query attends to them).
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCKED = torch.finfo(torch.float32).min  # LAR bias of a kept-sequence slot that holds no token


def equal_count_groups(visual_mask: Tensor):
    """The batch's rows grouped by their number of visual tokens: [(T, rows int64 [b])], so samples
    of equal count are handled as one batch (a uniform batch is one group)."""
    counts = visual_mask.sum(-1)
    return [(int(t), torch.nonzero(counts == t).flatten()) for t in torch.unique(counts).tolist()]


def left_pad(keep_index: Tensor, kept: Tensor, log_bias: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Kept sequences [b, n'] / [b, n', D] / [b, n'] left-padded to ``length`` with empty slots."""
    b, n = keep_index.shape
    pad = length - n
    if pad < 0:
        raise ValueError(f"a kept sequence of {n} positions does not fit the pruned length {length}")
    if pad == 0:
        return keep_index, kept, log_bias
    return (
        torch.cat([keep_index.new_zeros(b, pad), keep_index], 1),
        torch.cat([kept.new_zeros(b, pad, kept.shape[-1]), kept], 1),
        torch.cat([log_bias.new_full((b, pad), BLOCKED), log_bias], 1),
    )


def visual_positions(visual_mask: Tensor, num_visual: int) -> Tensor:
    """[B, N] bool with ``num_visual`` True per row -> [B, T] their positions, ascending."""
    counts = visual_mask.sum(-1)
    if bool((counts != num_visual).any()):
        raise ValueError(
            f"every sample must hold {num_visual} visual tokens; found {counts.tolist()} "
            "(samples with different numbers of visual tokens are not supported yet)"
        )
    order = torch.argsort((~visual_mask).to(torch.int8), dim=-1, stable=True)
    return order[:, :num_visual]


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, ...] gathered at index [B, M] along dim 1 -> [B, M, ...].

    Advanced indexing copies whole rows; ``gather`` with an expanded index walks element by
    element (3.5x slower for LLaVA's 576 x 1024 visual states on CPU)."""
    batch = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[batch, index]


def assemble(
    hidden: Tensor,
    visual_mask: Tensor,
    visual_pos: Tensor,
    anchors: Tensor,
    anchor_states: Tensor,
    anchor_log_bias: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Write the recycled anchor states in place, drop the other visual tokens.

    Returns ``keep_index`` [B, n'] (original positions, ascending: kept tokens keep their
    positions), ``hidden_kept`` [B, n', D] and ``log_bias`` [B, n'] float32 (the LAR bias
    of each kept key, 0 for text).
    """
    B, N, D = hidden.shape
    k = anchors.shape[1]
    anchor_pos = visual_pos.gather(1, anchors)
    keep = ~visual_mask
    keep = keep.scatter(1, anchor_pos, True)
    n_kept = N - visual_pos.shape[1] + k
    # contiguous: a slice of the [B, N] argsort would not match the op's fake (static-stride) output
    keep_index = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :n_kept].contiguous()
    # the anchors' rows in the kept sequence: both index lists ascend, so a sorted search finds them
    anchor_rows = torch.searchsorted(keep_index, anchor_pos)
    kept = gather_rows(hidden, keep_index)  # a fresh tensor: safe to write the recycled states into
    kept[torch.arange(B, device=hidden.device).unsqueeze(1), anchor_rows] = anchor_states.to(hidden.dtype)
    bias = torch.zeros(B, n_kept, dtype=torch.float32, device=hidden.device)
    return keep_index, kept, bias.scatter(1, anchor_rows, anchor_log_bias.to(torch.float32))
