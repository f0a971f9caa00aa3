"""era::select and era::recycle: the pruning ops the ``prune`` pass inserts at layer K; era::unprune
and era::kept_tokens: the exit and the entry of a split decoder's layers from K on.

They are opaque to Inductor (the selection is a sequential greedy loop, not worth fusing).
How many visual tokens each sample holds is data (``T_b``, counted from the visual mask), and so
are its budget ``k_b`` (the config's rule) and the pruned length ``n'`` (the longest sample's
text and anchors; padding, which no query attends to, goes like a pruned token): ``era::select``
gives the anchors as a ``[B, N]`` mask, and ``era::recycle``'s fake kernel gives ``n'`` as an
unbacked size, so one compiled graph serves every image size, number of images and ragged or
padded batch. Samples of equal ``T`` are selected as one batch, and each sample's kept sequence is
left-padded to ``n'`` with empty slots (``sequence.left_pad``).

    anchor_mask, confidence = era::select(hidden, visual_mask, queries, keys, attn_mask, ...)
    keep_index, hidden_kept, log_bias, samples = era::recycle(hidden, visual_mask, anchor_mask, confidence, ...)

A decoder that Dynamo split into per-layer graphs hands each layer the whole prompt [B, N], so each of
its layers from K on runs on the kept tokens between an entry and an exit (``passes/kept.py``,
``passes/restore.py``): ``era::unprune`` writes a layer's kept states back over the N positions and
gives the key bias [B, N] (the kept tokens' ``log b``, ``BLOCKED`` elsewhere); ``era::kept_tokens``
reads the kept positions and their bias off that key bias at the next layer's entry, laid out as
``era::recycle`` laid them out, with ``n'`` again an unbacked size.
"""

from __future__ import annotations

import functools
import json
import math

import torch
from torch import Tensor

from era_compile.algorithms import SelectionInputs, kept_count, run_strategy
from era_compile.algorithms.btr import recycle as btr_recycle
from era_compile.algorithms.saliency import instruction_saliency
from era_compile.algorithms.sequence import (
    BLOCKED,
    assemble,
    equal_count_groups,
    gather_rows,
    kept_slots,
    left_pad,
    real_tokens,
    text_tokens,
    visual_positions,
)


def selection_inputs(
    hidden: Tensor,
    visual_mask: Tensor,
    queries: Tensor,
    keys: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    num_visual: int,
) -> SelectionInputs:
    """What a strategy sees, from the tensors at the pruning point (shared with the eager reference)."""
    visual_pos = visual_positions(visual_mask, num_visual)
    attention_over_visual = functools.partial(
        instruction_saliency,
        queries,
        keys,
        visual_mask,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        num_visual=num_visual,
    )
    return SelectionInputs(
        hidden=gather_rows(hidden, visual_pos),
        queries_fn=lambda: gather_rows(queries.transpose(1, 2), visual_pos).transpose(1, 2),  # [B, H, T, d]
        saliency_fn=attention_over_visual,
        last_query_fn=functools.partial(attention_over_visual, last_query_only=True),
    )


def _rows(x: Tensor | None, rows: Tensor, batch: int) -> Tensor | None:
    """The given batch rows of a per-sample tensor (a mask broadcast over the batch stays as it is)."""
    return x if x is None or x.shape[0] != batch else x.index_select(0, rows)


def select_anchors(
    hidden: Tensor,
    visual_mask: Tensor,
    queries: Tensor,
    keys: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    keep_ratio: float | None,
    keep_tokens: int | None,
    strategy: str,
    options: dict,
) -> tuple[Tensor, Tensor]:
    """The strategy on every group of samples with equal T: anchor mask [B, N] bool (True at the
    anchors' positions), confidence [B, N] float32 (at visual positions; 1 elsewhere)."""
    B, N, _ = hidden.shape
    anchor_mask = torch.zeros(B, N, dtype=torch.bool, device=hidden.device)
    confidence = torch.ones(B, N, dtype=torch.float32, device=hidden.device)
    for T, rows in equal_count_groups(visual_mask):
        if T == 0:
            continue
        mask = visual_mask.index_select(0, rows)
        inputs = selection_inputs(
            hidden.index_select(0, rows),
            mask,
            queries.index_select(0, rows),
            keys.index_select(0, rows),
            _rows(attn_mask, rows, B),
            is_causal,
            scale,
            T,
        )
        sel = run_strategy(strategy, inputs, kept_count(T, keep_ratio, keep_tokens), options)
        positions = visual_positions(mask, T)
        anchor_mask[rows] = torch.zeros_like(mask).scatter(1, positions.gather(1, sel.anchors), True)
        if sel.confidence is not None:
            confidence[rows] = confidence[rows].scatter(1, positions, sel.confidence.to(torch.float32))
    return anchor_mask, confidence


def kept_length(visual_mask: Tensor, anchor_mask: Tensor, real: Tensor | None = None) -> int:
    """The pruned sequence's length: the longest sample's kept tokens (its text and its anchors;
    not its padding, where ``real`` marks the positions that hold a token)."""
    return int((text_tokens(visual_mask, real) | anchor_mask).sum(-1).max())


def recycle_kept(
    hidden: Tensor,
    visual_mask: Tensor,
    anchor_mask: Tensor,
    confidence: Tensor,
    merge: bool,
    weight_norm: str,
    real: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """BTR and sequence assembly per group of samples with equal T, each kept sequence left-padded
    to the longest one (``kept_length``); padding (not ``real`` [B, N], the positions that hold a
    token: ``real_tokens``) goes like a pruned token: keep_index [B, n'], hidden_kept [B, n', D],
    log_bias [B, n']."""
    B, N, D = hidden.shape
    kept_len = kept_length(visual_mask, anchor_mask, real)
    keep_index = torch.zeros(B, kept_len, dtype=torch.int64, device=hidden.device)
    hidden_kept = hidden.new_zeros(B, kept_len, D)
    log_bias = torch.zeros(B, kept_len, dtype=torch.float32, device=hidden.device)
    for T, rows in equal_count_groups(visual_mask):
        states = hidden.index_select(0, rows)
        mask = visual_mask.index_select(0, rows)
        positions = visual_positions(mask, T)
        anchors = positions.new_zeros(rows.numel(), 0)  # no image: every real token is kept
        recycled, bias = states.new_zeros(rows.numel(), 0, D), torch.zeros(rows.numel(), 0, device=hidden.device)
        if T > 0:
            is_anchor = anchor_mask.index_select(0, rows).gather(1, positions)
            anchors = torch.argsort((~is_anchor).to(torch.int8), dim=-1, stable=True)[:, : int(is_anchor[0].sum())]
            recycled, bias = btr_recycle(
                gather_rows(states, positions),
                anchors,
                confidence.index_select(0, rows).gather(1, positions),
                merge=merge,
                weight_norm=weight_norm,
            )
        kept = assemble(states, mask, positions, anchors, recycled, bias, None if real is None else real[rows])
        keep_index[rows], hidden_kept[rows], log_bias[rows] = left_pad(*kept, kept_len)
    return keep_index, hidden_kept, log_bias


def budget_tensor(keep_ratio: float | None, keep_tokens: int | None) -> Tensor:
    """The keep budget as the graph input ``era::select`` reads it on every call: float64 [2] on the
    CPU, (keep_ratio or NaN, keep_tokens or -1). An input, not a constant of the graph, so one
    compiled graph serves every budget (``EraBackend.budget``)."""
    return torch.tensor(
        [math.nan if keep_ratio is None else float(keep_ratio), -1.0 if keep_tokens is None else float(keep_tokens)],
        dtype=torch.float64,
    )


def read_budget(budget: Tensor) -> tuple[float | None, int | None]:
    ratio, tokens = budget.tolist()
    return (None if math.isnan(ratio) else ratio), (None if tokens < 0 else int(tokens))


@torch.library.custom_op("era::select", mutates_args=())
def select(
    hidden: Tensor,
    visual_mask: Tensor,
    queries: Tensor,
    keys: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    budget: Tensor,
    strategy: str,
    options: str,
) -> tuple[Tensor, Tensor]:
    """Anchor mask [B, N] and confidence [B, N] (see ``select_anchors``); ``budget``: ``budget_tensor``."""
    keep_ratio, keep_tokens = read_budget(budget)
    anchor_mask, confidence = select_anchors(
        hidden,
        visual_mask,
        queries,
        keys,
        attn_mask,
        is_causal,
        scale,
        keep_ratio,
        keep_tokens,
        strategy,
        json.loads(options),
    )
    return anchor_mask, confidence


@select.register_fake
def _(hidden, visual_mask, queries, keys, attn_mask, is_causal, scale, budget, strategy, options):
    return visual_mask.new_empty(visual_mask.shape), hidden.new_empty(visual_mask.shape, dtype=torch.float32)


def sample_counts(visual_mask: Tensor, anchor_mask: Tensor) -> Tensor:
    """int64 [B, 2]: each sample's visual tokens T_b and the k_b of them kept (what the report shows)."""
    return torch.stack([visual_mask.sum(-1), (visual_mask & anchor_mask).sum(-1)], -1)


@torch.library.custom_op("era::recycle", mutates_args=())
def recycle(
    hidden: Tensor,
    visual_mask: Tensor,
    anchor_mask: Tensor,
    confidence: Tensor,
    merge: bool,
    weight_norm: str,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BTR, then sequence assembly without the padding ``attn_mask`` (layer K's, over the N
    positions) shows: keep_index [B, n'], hidden_kept [B, n', D], log_bias [B, n'], and the samples'
    counts [B, 2] (``sample_counts``)."""
    real = real_tokens(attn_mask, *visual_mask.shape)
    keep_index, hidden_kept, log_bias = recycle_kept(
        hidden, visual_mask, anchor_mask, confidence, merge, weight_norm, real
    )
    _check_kept_length(keep_index.shape[1])
    return keep_index, hidden_kept, log_bias, sample_counts(visual_mask, anchor_mask)


# n' is data, an unbacked size the graph knows only as [MIN_KEPT, N]. At least 2 rather than 1, as Dynamo
# assumes of its own sizes: whether a [B, n', H, d] view is contiguous then has an answer (hybrid decoders'
# scans copy theirs contiguous), where at n' = 1 it would be a guard on the data.
MIN_KEPT = 2


def _check_kept_length(kept: int) -> None:
    if kept < MIN_KEPT:
        raise ValueError(
            f"era_compile: pruning would leave {kept} token(s) of the prompt (an image alone, and one kept): "
            f"keep at least {MIN_KEPT} (a larger keep_ratio or keep_tokens, or text in the prompt)"
        )


@recycle.register_fake
def _(hidden, visual_mask, anchor_mask, confidence, merge, weight_norm, attn_mask=None):
    B, N, D = hidden.shape
    # n' is data: a new unbacked size per trace, known only to lie in [MIN_KEPT, N]
    kept_len = torch.library.get_ctx().new_dynamic_size(min=MIN_KEPT)
    torch._check(kept_len <= N)
    return (
        hidden.new_empty((B, kept_len), dtype=torch.int64),
        hidden.new_empty((B, kept_len, D)),
        hidden.new_empty((B, kept_len), dtype=torch.float32),
        hidden.new_empty((B, 2), dtype=torch.int64),
    )


def without_lar(log_bias: Tensor) -> Tensor:
    """The kept keys' bias with LAR off: 0 at every kept token, still ``BLOCKED`` at a left-padding
    slot of a ragged batch (it holds no token)."""
    return torch.where(log_bias > BLOCKED, 0.0, BLOCKED).to(log_bias.dtype)


@torch.library.custom_op("era::unprune", mutates_args=())
def unprune(
    hidden: Tensor, keep_index: Tensor, hidden_kept: Tensor, log_bias: Tensor, rectify: bool
) -> tuple[Tensor, Tensor]:
    """The kept states ``hidden_kept`` [B, n', D] written back over ``hidden`` [B, N, D] at their
    positions (a pruned position keeps its state from ``hidden``; a left-padding slot of a ragged
    batch, ``BLOCKED`` bias, holds no token and writes nothing), and the key bias float32 [B, N]:
    each kept token's LAR bias at its position (0 with ``rectify`` off), ``BLOCKED`` at every other
    one. The exit of a split decoder's layer >= K (``passes/restore.py``): the eager loop between the
    layer graphs gets the prompt's [B, N, D] back, and layer K's key bias tells the later layers'
    ``era::kept_tokens`` what was kept."""
    slots = log_bias > BLOCKED
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(keep_index)[slots]
    positions = keep_index[slots]
    full = hidden.clone()
    full[rows, positions] = hidden_kept[slots]
    key_bias = torch.full(hidden.shape[:2], BLOCKED, dtype=torch.float32, device=hidden.device)
    key_bias[rows, positions] = (log_bias if rectify else without_lar(log_bias))[slots]
    return full, key_bias


@unprune.register_fake
def _(hidden, keep_index, hidden_kept, log_bias, rectify):
    return hidden.new_empty(hidden.shape), hidden.new_empty(hidden.shape[:2], dtype=torch.float32)


@torch.library.custom_op("era::kept_tokens", mutates_args=())
def kept_tokens(key_bias: Tensor) -> tuple[Tensor, Tensor]:
    """What ``era::unprune``'s key bias [B, N] says was kept: keep_index [B, n'] and log_bias
    [B, n'] as ``era::recycle`` laid them out (each sample's kept positions ascending, left-padded to
    the longest with empty slots: position 0, ``BLOCKED``). The entry of a split decoder's layer
    after K (``passes/kept.py``)."""
    order, filled = kept_slots(key_bias > BLOCKED)
    keep_index = torch.where(filled, order, 0)
    log_bias = torch.where(filled, key_bias.gather(1, order), BLOCKED).to(torch.float32)
    _check_kept_length(keep_index.shape[1])
    return keep_index, log_bias


@kept_tokens.register_fake
def _(key_bias):
    B, N = key_bias.shape
    kept_len = torch.library.get_ctx().new_dynamic_size(min=MIN_KEPT)  # n' is data, as era::recycle's
    torch._check(kept_len <= N)
    return key_bias.new_empty((B, kept_len), dtype=torch.int64), key_bias.new_empty((B, kept_len), dtype=torch.float32)
