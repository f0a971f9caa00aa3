"""The ``triton`` kernel of ``era::biased_attention``: a FlashAttention-style forward pass that
reads the per-key bias vector directly (no head-dim augmentation, no materialised mask).

One program computes a ``BLOCK_M`` block of queries of one (batch, query head). It walks the
keys in ``BLOCK_N`` blocks with an online softmax (running max ``m``, running sum ``l``)::

    s = q k^T * scale + bias[b, kv]  (+ float mask)    -inf where masked / causal / past Lk
    m' = max(m, rowmax(s));  p = exp(s - m');  l = l e^(m-m') + rowsum(p);  acc = acc e^(m-m') + p v

GQA: query head h reads key/value head ``h // (Hq / Hkv)``; K and V are never repeated.
``causal`` is end-aligned (query i sees keys j <= i + Lk - Lq), and a causal program stops at
its last visible key block. A row with no visible key returns zeros (like the other kernels).
fp32 inputs use IEEE dot products (not TF32), so fp32 results match the reference to ~1e-6.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it; the
interpreter has no bfloat16, so bf16 is tested on CUDA only).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .attention import _mask_4d

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: ``kernel="triton"`` then says how to get it
    triton = None

__all__ = ["triton_attention", "unsupported"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported(q: Tensor) -> str | None:
    """Why the triton kernel cannot run on q's device and dtype, or None when it can."""
    if triton is None:
        return "needs the triton package (pip install triton)"
    if not (q.device.type == "cuda" or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return f"runs on CUDA, or on CPU with TRITON_INTERPRET=1; got {q.device.type}"
    if q.dtype not in DTYPES:
        return f"supports fp32, fp16 and bf16, got {q.dtype}"
    return None


if triton is not None:

    @triton.jit
    def _forward(
        Q,
        K,
        V,
        Bias,
        Mask,
        Out,
        sqb,
        sqh,
        sqm,
        sqd,
        skb,
        skh,
        skn,
        skd,
        svb,
        svh,
        svn,
        svd,
        sbb,
        sbn,
        smb,
        smh,
        smm,
        smn,
        sob,
        soh,
        som,
        sod,
        Hq,
        Lq,
        Lk,
        group,
        D,
        DV,
        scale,
        HAS_BIAS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        MASK_IS_BOOL: tl.constexpr,
        CAUSAL: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // group
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < Lq

        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

        offset = Lk - Lq
        hi = Lk
        if CAUSAL:  # keys past the block's last query are invisible to all of its rows
            hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + offset)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
            k = tl.load(
                K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                mask=col_ok[None, :] & (offs_d[:, None] < D),
                other=0.0,
            )
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            visible = row_ok[:, None] & col_ok[None, :]
            if HAS_BIAS:
                s += tl.load(Bias + b * sbb + offs_n * sbn, mask=col_ok, other=0.0)[None, :]
            if HAS_MASK:
                m_ptr = Mask + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn
                if MASK_IS_BOOL:
                    visible &= tl.load(m_ptr, mask=visible, other=0) != 0
                else:
                    s += tl.load(m_ptr, mask=visible, other=0.0)
            if CAUSAL:
                visible &= offs_n[None, :] <= offs_m[:, None] + offset
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.exp(s - base[:, None])
            alpha = tl.exp(m_i - base)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(
            Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
        )


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, attn_mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    """[B, Hq, Lq, Dv] in q's dtype; inputs as ``era::biased_attention`` takes them (checked there)."""
    why = unsupported(q)
    if why is not None:
        raise RuntimeError(f"biased_attention kernel='triton' {why}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.size(1), k.size(2), v.size(-1)
    out = torch.empty((B, Hq, Lq, DV), dtype=q.dtype, device=q.device)
    if Lq == 0:
        return out

    bias32 = None if bias is None else bias.to(torch.float32).expand(B, Lk)
    mask = None
    if attn_mask is not None:
        mask = _mask_4d(attn_mask).expand(B, Hq, Lq, Lk)
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.float32)
    dummy = out  # an unused pointer argument when a tensor is absent
    bias_arg, mask_arg = (bias32 if bias32 is not None else dummy), (mask if mask is not None else dummy)
    bias_strides = bias32.stride() if bias32 is not None else (0, 0)
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)

    block_m = 16 if Lq <= 16 else 64
    block_n = 64 if q.device.type == "cuda" else 32
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    grid = (triton.cdiv(Lq, block_m), B * Hq)
    _forward[grid](
        q,
        k,
        v,
        bias_arg,
        mask_arg,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *mask_strides,
        *out.stride(),
        Hq,
        Lq,
        Lk,
        Hq // Hkv,
        D,
        DV,
        float(scale),
        HAS_BIAS=bias32 is not None,
        HAS_MASK=mask is not None,
        MASK_IS_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        CAUSAL=bool(causal),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
    )
    return out
