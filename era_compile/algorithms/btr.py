"""BTR, Bias-aware Token Recycling: merge pruned tokens into anchors (ALGORITHMS.md sections 5.3, 5.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from era_compile.algorithms.sequence import gather_rows

WEIGHT_NORMS = ("mean", "none", "max")
# Below this mean confidence of the pruned tokens (uniform heads) every recycled
# token counts 1 (section 5.3 guard).
GUARD_MEAN_CONFIDENCE = 1e-6


def _check(x: Tensor, anchors: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got {tuple(x.shape)}")
    if anchors.dim() != 2 or anchors.shape[0] != x.shape[0] or anchors.dtype != torch.int64:
        raise ValueError(f"anchors must be int64 [B={x.shape[0]}, k], got {anchors.dtype} {tuple(anchors.shape)}")
    if anchors.shape[1] > x.shape[1]:
        raise ValueError(f"more anchors ({anchors.shape[1]}) than tokens ({x.shape[1]})")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def assign_clusters(x: Tensor, anchors: Tensor, cosine: bool = True) -> Tensor:
    """Cluster slot in [0, k) of every token: int64 [B, T] (section 5.3 matching).

    A pruned token joins the anchor of highest cosine (or raw dot) similarity,
    computed in float32; an anchor always heads its own cluster, even when a raw dot
    product prefers another anchor. Needs k >= 1.
    """
    _check(x, anchors)
    b, t, d = x.shape
    k = anchors.shape[1]
    if k == 0:
        raise ValueError("assign_clusters: needs at least one anchor")
    feats = x.to(_compute_dtype(x))
    anchor_feats = gather_rows(feats, anchors)
    if cosine:  # a token's own norm scales all its scores alike: only the anchors need normalising
        anchor_feats = F.normalize(anchor_feats, dim=-1)
    slot = (feats @ anchor_feats.transpose(1, 2)).argmax(dim=-1)
    own = torch.arange(k, device=x.device).expand(b, k)
    return slot.scatter(1, anchors, own)


def cluster_counts(x: Tensor, anchors: Tensor, cosine: bool = True) -> Tensor:
    """Cluster sizes |C_a| = 1 + #matched pruned tokens: int64 [B, k] (section 5.3)."""
    _check(x, anchors)
    b, k = anchors.shape
    counts = torch.zeros(b, k, dtype=torch.int64, device=x.device)
    if k == 0:
        return counts
    slot = assign_clusters(x, anchors, cosine)
    return counts.scatter_add_(1, slot, torch.ones_like(slot))


def _mass_dtype(device: torch.device) -> torch.dtype:
    # float64 so that uniform confidence gives w == 1 to the last bit of the float32
    # log; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _recycled_weights(confidence: Tensor | None, is_anchor: Tensor, weight_norm: str) -> Tensor:
    """Per-token contribution to its cluster's bias, [B, T]: 1 for anchors, w_u for pruned."""
    dtype = _mass_dtype(is_anchor.device)
    ones = torch.ones(is_anchor.shape, dtype=dtype, device=is_anchor.device)
    if confidence is None:
        return ones
    if confidence.shape != is_anchor.shape:
        raise ValueError(f"confidence must be [B, T] = {tuple(is_anchor.shape)}, got {tuple(confidence.shape)}")
    pruned = ~is_anchor
    s = torch.where(pruned, confidence.to(dtype).clamp_min(0.0), 0.0)
    mean = s.sum(dim=-1, keepdim=True) / pruned.sum(dim=-1, keepdim=True).clamp_min(1)
    if weight_norm == "mean":
        w = s / mean.clamp_min(GUARD_MEAN_CONFIDENCE)
    elif weight_norm == "max":
        w = s / s.amax(dim=-1, keepdim=True).clamp_min(GUARD_MEAN_CONFIDENCE)
    else:
        w = s
    guarded = mean < GUARD_MEAN_CONFIDENCE
    return torch.where(is_anchor | guarded, ones, w)


def recycle(
    x: Tensor,
    anchors: Tensor,
    confidence: Tensor | None,
    *,
    merge: bool = True,
    weight_norm: str = "mean",
    cosine: bool = True,
) -> tuple[Tensor, Tensor]:
    """Recycle pruned tokens into their anchors (sections 5.3, 5.6).

    x [B, T, D], anchors [B, k] ascending int64, confidence [B, T] in [0, 1] or None
    (every recycled token counts 1) -> (x_anchor [B, k, D] in x.dtype, log_bias [B, k] float32).

    merge=True: x_anchor is the unweighted mean of the cluster ``{a} ∪ {u : m(u) = a}``
    and ``log_bias = log(1 + Σ_{u→a} w_u)``, w normalised by ``weight_norm``
    ("mean": s/mean_U s keeps Σ b = T; "none": s; "max": s/max_U s).
    merge=False: pure pruning, the anchor rows and a zero bias.
    """
    _check(x, anchors)
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {list(WEIGHT_NORMS)}, got {weight_norm!r}")
    b, t, d = x.shape
    k = anchors.shape[1]
    x_anchor = gather_rows(x, anchors)
    zero_bias = torch.zeros(b, k, dtype=torch.float32, device=x.device)
    if not merge or k == t or k == 0:  # nothing to recycle (k == 0: nowhere to put it)
        return x_anchor, zero_bias

    slot = assign_clusters(x, anchors, cosine)
    dtype = _compute_dtype(x)
    counts = torch.zeros(b, k, dtype=dtype, device=x.device).scatter_add_(
        1, slot, torch.ones(b, t, dtype=dtype, device=x.device)
    )
    # row-wise index_add over the flattened batch: scatter_add with an index expanded over D
    # walks element by element (several times slower on CPU for 576 x 1024 states)
    flat_slot = (slot + torch.arange(b, device=x.device).unsqueeze(1) * k).reshape(-1)
    sums = (
        torch.zeros(b * k, d, dtype=dtype, device=x.device)
        .index_add_(0, flat_slot, x.to(dtype).reshape(b * t, d))
        .view(b, k, d)
    )
    centroids = sums / counts.unsqueeze(-1)

    is_anchor = torch.zeros(b, t, dtype=torch.bool, device=x.device).scatter_(1, anchors, True)
    weights = _recycled_weights(confidence, is_anchor, weight_norm)
    mass = torch.zeros(b, k, dtype=weights.dtype, device=x.device).scatter_add_(1, slot, weights)
    return centroids.to(x.dtype), mass.log().to(torch.float32)
