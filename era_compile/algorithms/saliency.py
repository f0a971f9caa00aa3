"""DEP saliency from the instruction queries' attention over the visual keys (ALGORITHMS.md section 1.3)."""

from __future__ import annotations

import torch
from torch import Tensor

# Bound on the fp32 probability rows formed at once, [Hq, rows, N]: long
# instructions are processed in chunks of query rows instead.
MAX_CHUNK_ELEMENTS = 1 << 24


def _check_inputs(q: Tensor, k: Tensor, visual_mask: Tensor, attn_mask: Tensor | None, num_visual: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, hq, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head dim")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if visual_mask.shape != (b, n) or visual_mask.dtype != torch.bool:
        raise ValueError(f"visual_mask must be bool [B={b}, N={n}], got {visual_mask.dtype} {tuple(visual_mask.shape)}")
    if num_visual < 1:
        raise ValueError(f"num_visual must be >= 1, got {num_visual}")
    counts = visual_mask.sum(dim=-1)
    if bool((counts != num_visual).any()):
        raise ValueError(
            f"visual_mask marks {counts.tolist()} visual tokens per sample, "
            f"expected exactly num_visual={num_visual} in every row"
        )
    if attn_mask is not None:
        ok = attn_mask.dim() <= 4
        if ok:
            try:
                ok = torch.broadcast_shapes(attn_mask.shape, (b, hq, n, n)) == (b, hq, n, n)
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, N, N] = {(b, hq, n, n)}"
            )


class _SampleMask:
    """One sample's mask as additive bias rows, built only for the query rows asked for."""

    def __init__(
        self, attn_mask: Tensor | None, sample: int, n: int, is_causal: bool, dtype: torch.dtype, device: torch.device
    ):
        self.mask = None
        if attn_mask is not None:
            m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            self.mask = m4[sample if m4.shape[0] > 1 else 0].expand(m4.shape[1], n, n)  # [1 or H, N, N] view
        self.is_causal = is_causal
        self.dtype = dtype
        self.keys = torch.arange(n, device=device)
        # An additive float mask hides a key with -inf or with its dtype's most negative
        # value (what HF writes); anything at or below half of that counts as masked.
        self.masked_at = -torch.inf
        if self.mask is not None and self.mask.dtype != torch.bool:
            self.masked_at = torch.finfo(self.mask.dtype).min / 2

    def bias(self, rows: Tensor) -> Tensor:
        """Additive bias [1 or H, len(rows), N] in the compute dtype."""
        if self.mask is None:
            bias = torch.zeros(1, rows.numel(), self.keys.numel(), dtype=self.dtype, device=rows.device)
        elif self.mask.dtype == torch.bool:
            bias = torch.zeros((), dtype=self.dtype, device=rows.device).masked_fill(~self.mask[:, rows], -torch.inf)
        else:
            bias = self.mask[:, rows].to(self.dtype)
        if self.is_causal:
            bias = bias.masked_fill(self.keys > rows.unsqueeze(-1), -torch.inf)
        return bias

    def is_padding(self, rows: Tensor) -> Tensor:
        """bool [len(rows)]: the row sees no key, or not its own key, in any head.

        The first catches fully masked (left-padding) rows; the second right padding,
        where HF masks the padding keys but leaves those query rows open.
        """
        hidden = self.bias(rows) <= self.masked_at  # [1 or H, n, N]
        no_key = hidden.all(dim=-1)
        not_self = hidden.gather(-1, rows.view(1, -1, 1).expand(hidden.shape[0], -1, 1)).squeeze(-1)
        return (no_key | not_self).all(dim=0)


def _padding(mask: _SampleMask, rows: Tensor, chunk: int) -> Tensor:
    flags = [mask.is_padding(rows[start : start + chunk]) for start in range(0, rows.numel(), chunk)]
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool, device=rows.device)


def instruction_saliency(
    q: Tensor,
    k: Tensor,
    visual_mask: Tensor,
    *,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    num_visual: int,
    last_query_only: bool = False,
) -> Tensor:
    """Head-wise attention of the instruction queries over the visual keys: [B, Hq, T] float32 (section 1.3).

    q [B, Hq, N, d] and k [B, Hkv, N, d] are what the SDPA call receives (query head h
    reads kv head h // (Hq/Hkv)); ``attn_mask`` is None, bool (True = attend) or
    additive float, broadcastable to [B, Hq, N, N]; ``is_causal`` adds the causal mask.
    Rows I are the non-padding positions after the last visual token (else the last
    non-padding position). ``a_h[j] = mean_{i∈I} softmax(q_i Kᵀ·scale + m_i)[s_j]`` with
    the full-row denominator, in float32 (float64 for float64 inputs); only the |I|
    query rows are formed, in chunks. ``last_query_only``: I is the last non-padding position
    alone (FastV's score, ALGORITHMS.md §6.2).
    """
    _check_inputs(q, k, visual_mask, attn_mask, num_visual)
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    positions = torch.arange(n, device=q.device)
    out = torch.empty(b, hq, num_visual, dtype=torch.float32, device=q.device)
    chunk = max(1, MAX_CHUNK_ELEMENTS // (hq * n))

    for i in range(b):
        visual = positions[visual_mask[i]]
        mask = _SampleMask(attn_mask, i, n, is_causal, dtype, q.device)
        after = positions[positions > visual[-1]]
        rows = after[~_padding(mask, after, chunk)]
        if rows.numel() == 0 or last_query_only:  # the last real token asks
            real = positions[~_padding(mask, positions, chunk)]
            rows = real[-1:] if real.numel() else positions[-1:]

        keys = k[i].to(dtype)  # [Hkv, N, d]
        total = torch.zeros(hq, n, dtype=dtype, device=q.device)
        for start in range(0, rows.numel(), chunk):
            part = rows[start : start + chunk]
            queries = q[i][:, part].to(dtype).view(hkv, group, part.numel(), d)
            scores = torch.einsum("hgnd,hmd->hgnm", queries, keys).reshape(hq, part.numel(), n)
            probs = torch.softmax(scores * scale + mask.bias(part), dim=-1)
            total += torch.nan_to_num(probs, nan=0.0).sum(dim=1)  # a fully masked row adds nothing
        out[i] = (total[:, visual] / rows.numel()).to(torch.float32)
    return out
