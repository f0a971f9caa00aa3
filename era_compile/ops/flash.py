"""The FlashAttention kernels of ``era::biased_attention``: the bias rides in one extra head-dim
column (ALGORITHMS.md §5.5), so an unmodified flash kernel computes the biased logits exactly.

* ``sdpa_flash``: PyTorch's own FlashAttention backend (``SDPBackend.FLASH_ATTENTION``; CUDA
  with fp16/bf16, or its CPU implementation), no extra package.
* ``flash``: ``flash_attn.flash_attn_func`` from the flash-attn package, when importable.

Both take no arbitrary mask (padding keys must not be folded into the column: see
``augment_for_bias``). PyTorch's flash aligns ``is_causal`` to the top-left corner, so
``sdpa_flash`` serves causal calls only when that equals our end-aligned convention
(Lq == Lk, or Lq == 1 where causality hides nothing); flash-attn aligns to the bottom right
as we do. ``unsupported`` says why a call cannot run, so ``auto`` skips, and an explicit
request fails with that reason.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import _accum_dtype, default_scale

__all__ = ["augment_for_bias", "flash_kernel", "sdpa_flash_kernel", "unsupported"]

HALF = (torch.float16, torch.bfloat16)
MAX_AUGMENTED_HEAD_DIM = 256  # FlashAttention-2's largest head dim


@functools.cache
def _flash_attn_installed() -> bool:  # asked on every call of the op: look on disk once
    return importlib.util.find_spec("flash_attn") is not None


def _padded(width: int, multiple: int = 8) -> int:
    return -(-width // multiple) * multiple


def unsupported(
    kernel: str, q: Tensor, attn_mask: Tensor | None, causal: bool, q_len_is_k_len: bool, q_len_is_one: bool
) -> str | None:
    """Why ``kernel`` (sdpa_flash or flash) cannot run this call, or None when it can."""
    if kernel == "flash" and q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device.type}"
    if q.device.type not in ("cuda", "cpu"):
        return f"runs on CUDA or CPU, got {q.device.type}"
    if q.device.type == "cuda" and q.dtype not in HALF:
        return f"needs fp16 or bf16 on CUDA, got {q.dtype}"
    if attn_mask is not None:
        return "takes no attention mask (padding keys cannot ride in the bias column)"
    if _padded(q.size(-1) + 1) > MAX_AUGMENTED_HEAD_DIM:
        return f"head dim {q.size(-1)} + 1 exceeds FlashAttention's {MAX_AUGMENTED_HEAD_DIM}"
    if kernel == "flash" and not _flash_attn_installed():
        return "needs the flash-attn package (pip install flash-attn)"
    if kernel == "sdpa_flash" and causal and not (q_len_is_k_len or q_len_is_one):
        return "PyTorch's flash aligns causal masks top-left: only Lq == Lk or Lq == 1 match ours"
    return None


def sdpa_flash_kernel(q, k, v, bias, causal, scale) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q_aug, k_aug, v_aug, scale = augment_for_bias(q, k, v, bias, scale)
    causal = causal and q.size(2) > 1  # one query sees every key: no mask needed
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(
            q_aug, k_aug, v_aug, is_causal=causal, scale=scale, enable_gqa=q.size(1) != k.size(1)
        )
    return out[..., : v.size(-1)].contiguous()


def flash_kernel(q, k, v, bias, causal, scale) -> Tensor:
    from flash_attn import flash_attn_func

    q_aug, k_aug, v_aug, scale = augment_for_bias(q, k, v, bias, scale)
    # flash-attn wants [B, L, H, D]; it handles GQA and bottom-right causal itself
    out = flash_attn_func(
        q_aug.transpose(1, 2), k_aug.transpose(1, 2), v_aug.transpose(1, 2), softmax_scale=scale, causal=causal
    )
    return out.transpose(1, 2)[..., : v.size(-1)].contiguous()


def augment_for_bias(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None = None, multiple: int = 8
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Fold a per-key bias into one extra head-dim column (ALGORITHMS.md §5.5).

    ``Q~ = [Q, 1, 0..]``, ``K~ = [K, bias/scale, 0..]``, ``V~ = [V, 0..]``, widths padded to a
    multiple of ``multiple`` (d=128 -> 136) so flash kernels accept them. Then
    ``scale * Q~ K~^T = scale * Q K^T + bias`` exactly, and zero padding changes no dot product.

    Call the kernel with the RETURNED scale (``1/sqrt(original d)`` unless given), never its
    default ``1/sqrt(d + p)``, and slice the output back to ``[..., :Dv]``. Apply after RoPE.
    The column is stored in K's dtype (bf16: <= 0.25 absolute on ``sqrt(d)*phi`` for phi <= log 2880).
    GQA: the column goes on every KV head and the 1 on every query head. Padding keys belong in
    the kernel's mask, not here: a finfo.min bias overflows to -inf once divided by the scale.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("augment_for_bias: q, k, v must be 4-D [B, H, L, D]")
    if multiple < 1:
        raise ValueError(f"augment_for_bias: multiple must be >= 1, got {multiple}")
    d = q.size(-1)
    B, Hkv, Lk, _ = k.shape
    if scale is None:
        scale = default_scale(d)
    if scale == 0:
        raise ValueError("augment_for_bias: scale must be non-zero")
    width = _padded(d + 1, multiple)
    v_width = max(width, _padded(v.size(-1), multiple))

    q_aug = F.pad(q, (0, width - d))
    q_aug[..., d] = 1.0
    k_aug = F.pad(k, (0, width - d))
    if bias is not None:
        if bias.dim() != 2 or bias.size(1) != Lk or bias.size(0) not in (1, B):
            raise ValueError(f"augment_for_bias: bias must be [B, Lk] or [1, Lk], got {tuple(bias.shape)}")
        column = bias.to(_accum_dtype(q)) / scale  # scale * (1 * bias/scale) = bias
        k_aug[..., d] = column[:, None, :].expand(B, Hkv, Lk).to(k.dtype)
    v_aug = F.pad(v, (0, v_width - v.size(-1)))
    return q_aug, k_aug, v_aug, scale
