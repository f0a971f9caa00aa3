"""EntropyPrune: keep the visual tokens whose head-Gram matrix entropy is largest (ALGORITHMS.md §3).

For visual token t, ``M_t`` [H, d] holds its query in every head (layer K-1's attention).
Centred across heads, ``A_t = R_t R_tᵀ / H`` is the H x H head Gram; its eigenvalues ``ρ``
(clamped to >= 1e-10) give the score ``s_t = -Σ ρ ln ρ / ln H``, and the k largest are kept.

* As the released code does it, ``ρ`` is *not* trace-normalised, so the score is
  ``τ (H(p) - ln τ) / ln H`` with ``τ = tr A_t``, ``p = ρ / τ`` (§3.3.1); ``trace_normalize=True``
  scores the spectral entropy ``H(p) / ln H`` alone [prop].
* RoPE rotates all heads of a token by the same orthogonal matrix, which the Gram does not
  see: pre- and post-RoPE queries give the same score (§3.3.2).
* Dual Gram (§3.3.3): ``A_t`` (H x H) and the d x d covariance ``R_tᵀ R_t / H`` share their
  non-zero eigenvalues, so the eigensolve is H³ instead of d³ (32 heads, d = 128: 64x fewer flops).
  It runs in float64; inside a compiled graph it runs within ``era::select``, or as the
  ``era::head_gram_eigvalsh`` op (ops/spectral.py) in user code (Inductor does not lower eigvalsh).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from era_compile.algorithms import Selection, SelectionInputs, register_strategy, top_k_ascending

EIG_FLOOR = 1e-10
POOLED_CHANNELS = 128  # §3.2: wider heads (Gemma's 256) are mean-pooled to this many channels first


def pooled_channels(m: Tensor) -> Tensor:
    """[..., H, d] with d > 128 mean-pooled to [..., H, 128] over contiguous channel groups, as the
    released code does before the Gram (§3.2); narrower heads are returned as they are."""
    d = m.shape[-1]
    if d <= POOLED_CHANNELS:
        return m
    flat = m.reshape(-1, 1, d)
    return torch.nn.functional.adaptive_avg_pool1d(flat, POOLED_CHANNELS).reshape(*m.shape[:-1], POOLED_CHANNELS)


def _centred(m: Tensor) -> Tensor:
    """[..., H, d] in float64, centred across heads (§3.2 step 1)."""
    r = m.to(torch.float64)
    return r - r.mean(dim=-2, keepdim=True)


def head_gram(m: Tensor) -> Tensor:
    """[..., H, d] -> the centred head Gram [..., H, H] in float64 (§3.2 steps 1-2)."""
    r = _centred(m)
    return r @ r.transpose(-1, -2) / m.shape[-2]


def head_gram_eigenvalues(m: Tensor) -> Tensor:
    """Eigenvalues of the head Gram of every token: [..., H, d] -> [..., H] float64, ascending."""
    return torch.linalg.eigvalsh(head_gram(m))


def covariance_eigenvalues(m: Tensor) -> Tensor:
    """The direct route the dual Gram replaces: eigenvalues of ``R_tᵀ R_t / H`` [..., d]."""
    r = _centred(m)
    return torch.linalg.eigvalsh(r.transpose(-1, -2) @ r / m.shape[-2])


def _entropy(rho: Tensor, size: int) -> Tensor:
    """``-Σ ρ ln ρ / ln size`` over the last dim (0 when size is 1: nothing to spread over)."""
    return -(rho * rho.log()).sum(dim=-1) / math.log(size) if size > 1 else rho.new_zeros(rho.shape[:-1])


def matrix_entropy_scores(eigenvalues: Tensor, trace_normalize: bool = False) -> Tensor:
    """``-Σ ρ ln ρ / ln H`` over the last dim of clamped eigenvalues [..., H] (§3.2 steps 3-4)."""
    rho = eigenvalues.clamp_min(EIG_FLOOR)
    if trace_normalize:
        rho = rho / rho.sum(dim=-1, keepdim=True)
    return _entropy(rho, eigenvalues.shape[-1])


def entropyprune_scores(queries: Tensor, trace_normalize: bool = False) -> Tensor:
    """Per visual token score [B, T] from its queries [B, H, T, d] (float64; channels pooled to 128
    first when d > 128)."""
    per_token = pooled_channels(queries.transpose(1, 2))  # [B, T, H, min(d, 128)]
    return matrix_entropy_scores(head_gram_eigenvalues(per_token), trace_normalize)


def entropyprune_strategy(inputs: SelectionInputs, k: int, options: dict) -> Selection:
    """``"entropyprune"``: the k visual tokens of largest head-Gram entropy (§3.2, code-faithful).
    Options: ``trace_normalize`` (default False, as the released code)."""
    scores = entropyprune_scores(inputs.queries, bool(options.get("trace_normalize", False)))
    return Selection(anchors=top_k_ascending(scores, k))


register_strategy("entropyprune", entropyprune_strategy)


# --------------------------------------------------------------------------- Entropy Collapse Layer


def visual_matrix_entropy(z: Tensor) -> float:
    """Normalised matrix entropy of one sample's visual hidden states z [T, D] (§3.4 steps 2-3).

    Rows L2-normalised, ``G = Z Zᵀ / T`` (trace 1), ``H = -Σ λ ln λ / ln T`` over its
    eigenvalues. G and ``Zᵀ Z / T`` share their non-zero spectrum, so the smaller one is solved.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"visual_matrix_entropy: expected [T >= 2, D], got {tuple(z.shape)}")
    zn = torch.nn.functional.normalize(z.to(torch.float64), dim=-1)
    T = zn.shape[0]
    gram = zn @ zn.T if T <= zn.shape[1] else zn.T @ zn
    return float(_entropy(torch.linalg.eigvalsh(gram / T).clamp_min(EIG_FLOOR), T))


def entropy_collapse_layer(entropy_per_layer) -> int:
    """K = argmin over 1 <= l <= L/2 of H_l - H_(l-1): the layer after the largest drop (§3.4 step 4)."""
    h = [float(x) for x in entropy_per_layer]
    if len(h) < 2:
        raise ValueError("entropy_collapse_layer: need the entropy of at least two layers")
    candidates = range(1, max(2, len(h) // 2 + 1))
    return min(candidates, key=lambda layer: h[layer] - h[layer - 1])
