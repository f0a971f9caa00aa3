"""era::select and era::recycle: the pruning ops the ``prune`` pass inserts at layer K.

They are opaque to Inductor (the selection is a sequential greedy loop, not worth fusing),
and their fake kernels give static shapes: ``k`` anchors of ``T`` visual tokens and
``n' = N - T + k`` kept positions, all known when the graph is compiled.

    anchors, confidence = era::select(hidden, visual_mask, queries, keys, attn_mask, ...)
    keep_index, hidden_kept, log_bias = era::recycle(hidden, visual_mask, anchors, confidence, ...)
"""

from __future__ import annotations

import functools
import json
from typing import Optional, Tuple

import torch
from torch import Tensor

from era_compile.algorithms import SelectionInputs, run_strategy
from era_compile.algorithms.btr import recycle as btr_recycle
from era_compile.algorithms.saliency import instruction_saliency
from era_compile.algorithms.sequence import assemble, gather_rows, visual_positions


def selection_inputs(hidden: Tensor, visual_mask: Tensor, queries: Tensor, keys: Tensor,
                     attn_mask: Optional[Tensor], is_causal: bool, scale: float,
                     num_visual: int) -> SelectionInputs:
    """What a strategy sees, from the tensors at the pruning point (shared with the eager reference)."""
    visual_pos = visual_positions(visual_mask, num_visual)
    attention_over_visual = functools.partial(instruction_saliency, queries, keys, visual_mask, attn_mask=attn_mask,
                                              is_causal=is_causal, scale=scale, num_visual=num_visual)
    return SelectionInputs(
        hidden=gather_rows(hidden, visual_pos),
        queries_fn=lambda: gather_rows(queries.transpose(1, 2), visual_pos).transpose(1, 2),  # [B, H, T, d]
        saliency_fn=attention_over_visual,
        last_query_fn=functools.partial(attention_over_visual, last_query_only=True),
    )


@torch.library.custom_op("era::select", mutates_args=())
def select(hidden: Tensor, visual_mask: Tensor, queries: Tensor, keys: Tensor,
           attn_mask: Optional[Tensor], is_causal: bool, scale: float, num_visual: int,
           keep: int, strategy: str, options: str) -> Tuple[Tensor, Tensor]:
    """Anchors [B, keep] (indices into the T visual tokens, ascending) and confidence [B, T]."""
    inputs = selection_inputs(hidden, visual_mask, queries, keys, attn_mask, is_causal, scale, num_visual)
    sel = run_strategy(strategy, inputs, keep, json.loads(options))
    confidence = sel.confidence
    if confidence is None:  # every recycled token counts 1
        confidence = torch.ones(hidden.shape[0], num_visual, device=hidden.device)
    return sel.anchors.contiguous(), confidence.to(torch.float32).contiguous()


@select.register_fake
def _(hidden, visual_mask, queries, keys, attn_mask, is_causal, scale, num_visual, keep, strategy, options):
    B = hidden.shape[0]
    return (hidden.new_empty((B, keep), dtype=torch.int64),
            hidden.new_empty((B, num_visual), dtype=torch.float32))


@torch.library.custom_op("era::recycle", mutates_args=())
def recycle(hidden: Tensor, visual_mask: Tensor, anchors: Tensor, confidence: Tensor, num_visual: int,
            merge: bool, weight_norm: str) -> Tuple[Tensor, Tensor, Tensor]:
    """BTR, then sequence assembly: keep_index [B, n'], hidden_kept [B, n', D], log_bias [B, n']."""
    visual_pos = visual_positions(visual_mask, num_visual)
    states, log_bias = btr_recycle(gather_rows(hidden, visual_pos), anchors, confidence,
                                   merge=merge, weight_norm=weight_norm)
    return assemble(hidden, visual_mask, visual_pos, anchors, states, log_bias)


@recycle.register_fake
def _(hidden, visual_mask, anchors, confidence, num_visual, merge, weight_norm):
    B, N, D = hidden.shape
    n_kept = N - num_visual + anchors.shape[1]
    return (hidden.new_empty((B, n_kept), dtype=torch.int64),
            hidden.new_empty((B, n_kept, D)),
            hidden.new_empty((B, n_kept), dtype=torch.float32))

