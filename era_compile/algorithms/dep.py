"""DEP, Dual-view Entropy Pruning: ERA's anchor selection (ALGORITHMS.md sections 5.2, 5.6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from era_compile.algorithms import Selection, SelectionInputs, register_strategy
from era_compile.algorithms.dpp import greedy_map

DEFAULT_LAMBDA = 1.0
DEFAULT_BETA = 0.5
# ln max(y, 1e-12): 0 * ln 0 counts as 0 (section 5.6).
LOG_FLOOR = 1e-12
# Row norms below this count as this (F.normalize's eps): a zero row stays zero.
NORM_FLOOR = 1e-12


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least; float64 when any input is float64 (exactness tests)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def head_distribution(saliency: Tensor) -> Tensor:
    """Per-token distribution over heads, ``l1`` head norm: [B, H, T] -> Y [B, T, H] (section 5.2 step 2).

    Negative values clamp to 0. A token no head attends to (all zeros) gets the
    uniform distribution: no head vouches for it, so it is maximally uncertain rather than 0/0.
    """
    if saliency.dim() != 3:
        raise ValueError(f"saliency must be [B, H, T], got {tuple(saliency.shape)}")
    a = saliency.to(_compute_dtype(saliency)).clamp_min(0).transpose(1, 2)
    total = a.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(a, 1.0 / a.shape[-1])
    return torch.where(total > 0, a / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def head_entropy(saliency: Tensor) -> Tensor:
    """Normalised head entropy ê [B, T] in [0, 1] of saliency [B, H, T] (section 5.2 step 2).

    ``ê = -Σ_h y ln max(y, 1e-12) / ln H``; a single head carries no head distribution,
    so H == 1 gives ê = 0.
    """
    return _normalised_entropy(head_distribution(saliency))


def _normalised_entropy(y: Tensor) -> Tensor:
    heads = y.shape[-1]
    if heads == 1:
        return y.new_zeros(y.shape[:2])
    entropy = -(y * y.clamp_min(LOG_FLOOR).log()).sum(dim=-1) / math.log(heads)
    return entropy.clamp(0.0, 1.0)  # round-off only; keeps 1 - ê a valid confidence


def dual_view_features(x: Tensor, y: Tensor, beta: float, quality: Tensor | None = None) -> Tensor:
    """``F = [√(1-β) x̂ ; √β ŷ]`` [B, T, D + H] from X [B, T, D] and Y [B, T, H]: the dual-view
    similarity is its Gram, ``S = F Fᵀ`` (section 5.2 step 3). ``quality`` [B, T] scales row i by
    ``q_i``, making the Gram ``diag(q) S diag(q)``.

    Rows are L2-normalised in float32 (float64 for float64 inputs), so S is PSD with unit diagonal.
    One scaled multiply per view, written into one buffer (no normalised copies, no concatenation).
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"dual_view_features: need X [B, T, D], Y [B, T, H], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    dtype = _compute_dtype(x, y)
    d = x.shape[-1]
    out = torch.empty(*x.shape[:2], d + y.shape[-1], dtype=dtype, device=x.device)
    for view, weight, columns in ((x, 1.0 - beta, out[..., :d]), (y, beta, out[..., d:])):
        view = view.to(dtype)
        scale = math.sqrt(weight) / torch.linalg.vector_norm(view, dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
        if quality is not None:
            scale = scale * quality.to(dtype).unsqueeze(-1)
        torch.mul(view, scale, out=columns)
    return out


def dual_view_similarity(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """``S = (1-β) X̂X̂ᵀ + β ŶŶᵀ`` [B, T, T] (section 5.2 step 3)."""
    features = dual_view_features(x, y, beta)
    return features @ features.transpose(1, 2)


def dep_select(x: Tensor, saliency: Tensor, k: int, lam: float, beta: float) -> tuple[Tensor, Tensor]:
    """DEP anchors [B, k] (int64, ascending) and head entropy ê [B, T] (sections 5.2 step 4, 5.6).

    Greedy MAP on ``diag(q) S diag(q)`` with quality ``q = exp(-λ ê)``, i.e. each step
    maximises the log-det diversity gain minus ``2λ ê``. That kernel is the Gram of the
    rows ``q_i F_i``: one matrix product, no T x T elementwise passes.
    """
    if x.dim() != 3 or saliency.dim() != 3 or saliency.shape[0] != x.shape[0] or saliency.shape[2] != x.shape[1]:
        raise ValueError(
            f"dep_select: need hidden [B, T, D] and saliency [B, H, T], got "
            f"{tuple(x.shape)} and {tuple(saliency.shape)}"
        )
    y = head_distribution(saliency)
    entropy = _normalised_entropy(y)
    weighted = dual_view_features(x, y, beta, quality=torch.exp(-lam * entropy))
    return greedy_map(weighted @ weighted.transpose(1, 2), k), entropy


def era_strategy(inputs: SelectionInputs, k: int, options: dict) -> Selection:
    """The ``"era"`` strategy: DEP anchors, confidence ``1 - ê`` for BTR's weights (section 5.6)."""
    lam = float(options.get("lam", DEFAULT_LAMBDA))
    beta = float(options.get("beta", DEFAULT_BETA))
    anchors, entropy = dep_select(inputs.hidden, inputs.saliency, k, lam, beta)
    return Selection(anchors=anchors, confidence=1.0 - entropy)


register_strategy("era", era_strategy)
