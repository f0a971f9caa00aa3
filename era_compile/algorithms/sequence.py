"""Sequence surgery: from the chosen anchors to the pruned sequence (ALGORITHMS.md section 2.3).

Shapes stay static: ``T`` visual tokens per sample and ``k`` anchors give ``n' = N - T + k``
kept positions per sample, found with a stable sort instead of ``nonzero``. In a ragged batch
(samples with different T) each sample's kept sequence is left-padded to the longest one with
slots that hold no token: position 0, zero state, a ``BLOCKED`` bias (no query attends to them).
Padding goes like a pruned token (``real_tokens``): a padded sample keeps its text and anchors only.
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
    real: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Write the recycled anchor states in place, drop the other visual tokens and, where ``real``
    [B, N] bool says which positions hold a token, the padding (``real_tokens``).

    Returns ``keep_index`` [B, n'] (original positions, ascending: kept tokens keep their
    positions), ``hidden_kept`` [B, n', D] and ``log_bias`` [B, n'] float32 (the LAR bias
    of each kept key, 0 for text). Rows that keep fewer than the longest (their padding went)
    start with empty slots, as ``left_pad`` makes them.
    """
    B = hidden.shape[0]
    anchor_pos = visual_pos.gather(1, anchors)
    keep = text_tokens(visual_mask, real).scatter(1, anchor_pos, True)
    order, filled = kept_slots(keep)
    keep_index = torch.where(filled, order, 0)
    # the anchors' rows in the kept sequence: both ascend (empty slots at -1), so a sorted search finds them
    anchor_rows = torch.searchsorted(torch.where(filled, order, -1), anchor_pos)
    kept = torch.where(filled[..., None], gather_rows(hidden, keep_index), 0).to(hidden.dtype)
    kept[torch.arange(B, device=hidden.device).unsqueeze(1), anchor_rows] = anchor_states.to(hidden.dtype)
    bias = torch.where(filled, 0.0, BLOCKED).to(torch.float32)
    return keep_index, kept, bias.scatter(1, anchor_rows, anchor_log_bias.to(torch.float32))


def kept_slots(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept sequence's layout from ``keep`` [B, N] bool (the positions each sample keeps): per
    slot [B, n'] (n' the most any sample keeps) the position it reads and whether it holds a token.
    Kept positions come last, ascending; a row keeping fewer begins with positions it drops, which
    hold no token (``left_pad``'s empty slots)."""
    B, N = keep.shape
    n_kept = int(keep.sum(-1).max()) if B else 0
    # contiguous: a slice of the [B, N] argsort would not match the ops' fake, static-stride outputs
    order = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[:, N - n_kept :].contiguous()
    return order, keep.gather(1, order)


def text_tokens(visual_mask: Tensor, real: Tensor | None) -> Tensor:
    """[B, N] bool: the positions a pruned sequence keeps whatever the selection: its text, not its
    padding (where ``real`` marks the positions that hold a token)."""
    return ~visual_mask if real is None else ~visual_mask & real


def real_tokens(attn_mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """[B, N] bool, the positions of a prefill that hold a token, read off its attention mask
    ([B or 1, H or 1, N, N], bool or additive): every token attends to itself, and no query attends
    to padding, left or right. None where there is no mask (no padding)."""
    if attn_mask is None:
        return None
    attends = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    seen = attends[..., -length:].any(dim=-2).any(dim=1)  # over the queries, then the heads: [B or 1, N]
    return seen.expand(batch, length)
