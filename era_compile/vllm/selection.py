"""ERA at K = 0 on a vLLM decoder's input: the same selection and recycling as the Hugging Face path.

The HF path (``passes/prune.py`` in a graph, ``EagerReference`` eagerly) scores the visual tokens with
layer 0's queries and keys on the unpruned input: input RMSNorm, the q/k projections, RoPE at the
original positions (ALGORITHMS.md section 1.3). Here the same three steps run through a vLLM decoder
layer's own modules, and the result goes to the same functions the pruning ops call
(``ops.prune.select_anchors`` and ``recycle_kept``), so the anchors are the HF path's by construction
of everything but vLLM's modules, and the tests check those against HF's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from era_compile.config import ERAConfig
from era_compile.ops.prune import recycle_kept, select_anchors


@dataclass(frozen=True)
class Pruned:
    """One prompt pruned at its input: ``keep_index`` [n'] positions kept (text and anchors, ascending),
    ``hidden`` [n', D] their states (anchors with their recycled tokens folded in), ``log_bias`` [n']
    each kept token's ``log b`` (0 for text), ``anchors`` [k] the anchors' indices among the T visual tokens."""

    keep_index: Tensor
    hidden: Tensor
    log_bias: Tensor
    anchors: Tensor


def layer0_queries_and_keys(layer: Any, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, float]:
    """q [1, Hq, N, d] and k [1, Hkv, N, d] of a vLLM Llama-style decoder layer's attention on
    ``hidden`` [N, D] at ``positions`` ([N], or [3, N] for M-RoPE), and the attention's scale: what its
    attention op receives."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.input_layernorm(hidden))
    q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q.clone(), k.clone())
    n = hidden.shape[0]
    q = q.reshape(n, -1, attn.head_dim).transpose(0, 1)[None]
    k = k.reshape(n, -1, attn.head_dim).transpose(0, 1)[None]
    return q, k, float(attn.scaling)


def prune_prompt(layer: Any, hidden: Tensor, positions: Tensor, visual_mask: Tensor, config: ERAConfig) -> Pruned:
    """ERA (or ``config.strategy``) at K = 0 on one prompt's merged, unpruned embeddings ``hidden``
    [N, D]; ``visual_mask`` [N] bool marks the visual tokens (all the prompt's images: one pool)."""
    if config.resolved_layer != 0:
        raise ValueError(f"ERAConfig.layer={config.layer!r}: the vLLM path prunes at K = 0 only")
    q, k, scale = layer0_queries_and_keys(layer, hidden, positions)
    states, visual = hidden[None], visual_mask[None]
    anchor_mask, confidence = select_anchors(
        states,
        visual,
        q,
        k,
        None,
        True,
        scale,
        config.keep_ratio,
        config.keep_tokens,
        config.strategy,
        config.strategy_options(),
    )
    keep_index, kept, log_bias = recycle_kept(
        states, visual, anchor_mask, confidence, config.recycle, config.weight_norm
    )
    anchors = torch.nonzero(anchor_mask[0][visual_mask]).flatten()
    return Pruned(keep_index[0], kept[0], log_bias[0], anchors)
