"""``era::biased_attention``: attention with a per-key log bias (LAR, ALGORITHMS.md §5.4).

After BTR merges visual tokens, anchor key ``j`` stands for ``b_j`` original tokens. LAR
(Logit-preserving Attention Rectification) restores their share of the softmax mass by adding
``phi_j = log b_j`` to every query's logit for key ``j``, in every head, in prefill and decode::

    O = softmax(Q K^T * scale + M + 1 phi^T) V        (M: causal and/or the model's own mask)

``phi`` belongs to the key (shape ``[B, Lk]``), so once cached with its key every later query
sees it. ``biased_attention`` is a ``torch.library`` custom op with a fake kernel, so a compiled
graph carries it as one opaque node (no graph break); its body picks a kernel:

=========  ==========================================================  ======================
kernel     how the bias enters                                         notes
=========  ==========================================================  ======================
``sdpa``   one additive float mask ``bias + causal + attn_mask``        the reference; runs
           passed to ``F.scaled_dot_product_attention``                anywhere
``flex``   ``score_mod = score + bias[b, kv]`` (+ float mask);          no padding; eager
           causal / bool masks as a ``BlockMask``                      (unfused) inside the op
``auto``   ``sdpa`` for now                                            issue 5 picks by
                                                                       measurement
=========  ==========================================================  ======================

The FlashAttention kernels of DESIGN.md §5 use ``augment_for_bias`` (ALGORITHMS.md §5.5):
one extra head-dim column carries ``phi`` exactly, at the *original* scale.

Conventions shared by every kernel:

* ``causal=True`` aligns queries to the END of the keys: query ``i`` sees keys
  ``j <= i + Lk - Lq`` (decode, chunked prefill).
* A query row with no attendable key (every logit ``-inf``: a padding query) returns zeros,
  as SDPA's bool-mask path and flex do. Logit sums that overflow to ``-inf`` count as masked.
* The bias and any float mask are accumulated in float32 (float64 for float64 inputs). The
  sdpa kernel then rounds the combined mask once to q's dtype for bf16/fp16 inputs (what the
  CUDA SDPA kernels accept): for ``phi <= log 2880`` that is <= 0.016 on the logit in bf16.
  flex adds the float32 bias to float32 scores, so it does not round the bias.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq
from torch import sym_not
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KERNELS", "augment_for_bias", "biased_attention", "biased_attention_op", "resolve_kernel"]

KERNELS = ("auto", "sdpa", "flex")


# --------------------------------------------------------------------------- validation


def _differ(a, b) -> bool:
    """True only when two sizes are known to differ. A check must never install a guard: in
    Dynamo's ShapeEnv, comparing two symbolic lengths would specialise them (every decode
    step would recompile)."""
    return statically_known_true(sym_not(sym_eq(a, b)))


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], attn_mask: Optional[Tensor], kernel: str
) -> None:
    """Shape/dtype checks shared by the real and the fake kernel (errors surface at trace time)."""
    if kernel not in KERNELS:
        raise ValueError(f"biased_attention: unknown kernel {kernel!r}; expected one of {KERNELS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "biased_attention: q, k, v must be 4-D [B, H, L, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"biased_attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, _, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if _differ(Bk, B) or _differ(v.size(0), B):
        raise ValueError(f"biased_attention: batch sizes differ: q {B}, k {Bk}, v {v.size(0)}")
    if _differ(Dk, D):
        raise ValueError(f"biased_attention: q and k head dims differ: {D} vs {Dk}")
    if _differ(v.size(1), Hkv) or _differ(v.size(2), Lk):
        raise ValueError(f"biased_attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads/length")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"biased_attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA"
        )
    if bias is not None:
        if bias.dim() != 2 or _differ(bias.size(1), Lk) or (_differ(bias.size(0), 1) and _differ(bias.size(0), B)):
            raise ValueError(
                f"biased_attention: bias must be [B, Lk] or [1, Lk] = [{B} or 1, {Lk}], got {tuple(bias.shape)}"
            )
        if not bias.dtype.is_floating_point:
            raise ValueError(f"biased_attention: bias must be floating point, got {bias.dtype}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(f"biased_attention: attn_mask must be bool or float, got {attn_mask.dtype}")
        target = (B, Hq, q.size(2), Lk)
        ok = attn_mask.dim() <= 4 and not any(
            _differ(m, 1) and _differ(m, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
        if not ok:
            raise ValueError(
                f"biased_attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = {target}"
            )


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: ``1/sqrt(d)`` of the original head dim (never of an
    augmented one)."""
    return 1.0 / math.sqrt(head_dim)


def resolve_kernel(kernel: str, q: Optional[Tensor] = None) -> str:
    """The concrete kernel for a requested name: ``"auto"`` becomes ``"sdpa"``.

    ``q`` (a real or fake tensor, may be None) is where issue 5 will choose by device, dtype
    and shape from measurements; today "auto" is always the reference kernel.
    """
    if kernel not in KERNELS:
        raise ValueError(f"biased_attention: unknown kernel {kernel!r}; expected one of {KERNELS}")
    return "sdpa" if kernel == "auto" else kernel


def _accum_dtype(q: Tensor) -> torch.dtype:
    # Biases are log counts next to -1e4-style padding: keep them out of half precision.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _mask_4d(attn_mask: Tensor) -> Tensor:
    """Left-pad a broadcastable mask with size-1 dims to 4-D (a view)."""
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


# --------------------------------------------------------------------------- sdpa kernel


def _sdpa_kernel(q, k, v, bias, attn_mask, causal, scale) -> Tensor:
    Lq, Lk = q.size(2), k.size(2)
    acc = _accum_dtype(q)
    neg_inf = float("-inf")

    # One additive mask, built in float32/float64; -inf marks "may not attend".
    mask: Optional[Tensor] = None
    if bias is not None:
        mask = bias.to(acc)[:, None, None, :]  # [B|1, 1, 1, Lk]
    if attn_mask is not None:
        am = _mask_4d(attn_mask)
        if am.dtype == torch.bool:
            am = torch.zeros((), dtype=acc, device=q.device).masked_fill(~am, neg_inf)
        else:
            am = am.to(acc)
        mask = am if mask is None else mask + am
    if causal:
        q_pos = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)  # end-aligned
        kv_pos = torch.arange(Lk, device=q.device)[None, :]
        cm = torch.zeros((Lq, Lk), dtype=acc, device=q.device).masked_fill(kv_pos > q_pos, neg_inf)
        mask = cm if mask is None else mask + cm

    gqa = q.size(1) != k.size(1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        return out.contiguous()

    # A row of only -inf would make SDPA's softmax 0/0 on some backends: give it a harmless
    # 0 row and zero its output afterwards (same result as SDPA's bool-mask path and flex).
    dead_rows = torch.isneginf(mask).all(dim=-1, keepdim=True)  # [B|1, H|1, Lq|1, 1]
    mask = mask.masked_fill(dead_rows, 0.0)
    if mask.dtype != q.dtype and q.dtype not in (torch.float32, torch.float64):
        # bf16/fp16: SDPA's CUDA kernels want the mask in q's dtype. Clamp finite values
        # (finfo(fp32).min would round to -inf) and keep true -inf as -inf.
        finite = mask.clamp(min=torch.finfo(q.dtype).min)
        mask = finite.masked_fill(torch.isneginf(mask), neg_inf).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.masked_fill(dead_rows, 0.0).contiguous()


# --------------------------------------------------------------------------- flex kernel


# Dispatch keys vmap needs. A TorchDispatchMode's __torch_dispatch__ excludes them while it runs
# the op, and AOTAutograd runs every compiled graph's first call under such a mode (its
# custom-op aliasing check), so eager flex's vmap would fail there ("Cannot access storage of
# BatchedTensorImpl"). Our inputs are plain tensors, so re-enabling the keys for a fresh vmap is safe.
_FUNCTORCH_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
for _name in ("FuncTorchDynamicLayerFrontMode", "FuncTorchDynamicLayerBackMode", "FuncTorchBatched",
              "FuncTorchVmapMode", "FuncTorchGradWrapper", "PythonTLSSnapshot"):
    _FUNCTORCH_KEYS = _FUNCTORCH_KEYS | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _name))


@contextlib.contextmanager
def _functorch_enabled():
    if not torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode):
        yield  # plain eager: nothing to undo
        return
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - _FUNCTORCH_KEYS):
        yield


def _flex_block_mask(causal, bool_mask, B, Hq, Lq, Lk, device):
    """Hard masks as a BlockMask, so a fused (GPU) flex can skip empty blocks; None if none."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not causal and bool_mask is None:
        return None
    offset = Lk - Lq  # end-aligned causal
    if bool_mask is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return create_block_mask(mask_mod, None, None, Lq, Lk, device=device)

    # B/H = None tells the BlockMask a size-1 mask dim broadcasts; the expanded view lets
    # mask_mod index [b, h, ...] either way.
    mask_b = None if bool_mask.size(0) == 1 else B
    mask_h = None if bool_mask.size(1) == 1 else Hq
    full_bool = bool_mask.expand(B, Hq, Lq, Lk)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = full_bool[b, h, q_idx, kv_idx]
        return (allowed & (kv_idx <= q_idx + offset)) if causal else allowed

    return create_block_mask(mask_mod, mask_b, mask_h, Lq, Lk, device=device)


def _flex_kernel(q, k, v, bias, attn_mask, causal, scale) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    B, Hq, Lq, _ = q.shape
    Lk = k.size(2)
    acc = _accum_dtype(q)

    # Dense per-(b, kv) bias table, read by score_mod; [1, Lk] is expanded (a view, no copy).
    bias_table = None if bias is None else bias.to(acc).expand(B, Lk)
    float_mask = bool_mask = None
    if attn_mask is not None:
        am = _mask_4d(attn_mask)
        if am.dtype == torch.bool:
            bool_mask = am
        else:
            float_mask = am.to(acc).expand(B, Hq, Lq, Lk)

    score_mod = None
    if bias_table is not None and float_mask is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias_table[b, kv_idx] + float_mask[b, h, q_idx, kv_idx]

    elif bias_table is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias_table[b, kv_idx]

    elif float_mask is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + float_mask[b, h, q_idx, kv_idx]

    try:
        with _functorch_enabled():
            block_mask = _flex_block_mask(causal, bool_mask, B, Hq, Lq, Lk, q.device)
            # Eager flex (this body is opaque to Inductor): unfused, materialises the scores in
            # float32 (float64 for float64); GQA is broadcast inside flex, we never repeat K/V.
            out = flex_attention(
                q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1)
            )
    except Exception as err:  # whatever flex does not support (dtype, device, shape)
        raise RuntimeError(
            f"biased_attention kernel='flex' cannot run on {q.device.type} with dtype {q.dtype}, "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: {err}. Use kernel='sdpa'."
        ) from err
    return out.contiguous()


# --------------------------------------------------------------------------- the custom op


@torch.library.custom_op("era::biased_attention", mutates_args=())
def biased_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    attn_mask: Optional[Tensor],
    causal: bool,
    scale: Optional[float],
    kernel: str,
) -> Tensor:
    """softmax(q k^T * scale + bias + masks) v; see the module docstring. Returns [B, Hq, Lq, Dv]."""
    _check_inputs(q, k, v, bias, attn_mask, kernel)
    if scale is None:
        scale = default_scale(q.size(-1))
    if resolve_kernel(kernel, q) == "sdpa":
        return _sdpa_kernel(q, k, v, bias, attn_mask, causal, scale)
    return _flex_kernel(q, k, v, bias, attn_mask, causal, scale)


@biased_attention_op.register_fake
def _biased_attention_fake(q, k, v, bias, attn_mask, causal, scale, kernel):
    _check_inputs(q, k, v, bias, attn_mask, kernel)
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.size(-1)))  # contiguous, like every real kernel


def biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    attn_mask: Optional[Tensor] = None,
    kernel: str = "auto",
) -> Tensor:
    """Attention with a per-key additive bias ``bias[b, j]`` (LAR).

    q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D|Dv]`` with ``Hq % Hkv == 0`` (GQA); bias
    ``[B, Lk]`` / ``[1, Lk]`` or None; attn_mask bool (True = attend) or additive float,
    broadcastable to ``[B, Hq, Lq, Lk]``; ``causal`` is end-aligned; ``scale`` defaults to
    ``1/sqrt(D)``. Returns ``[B, Hq, Lq, Dv]`` in q's dtype.
    """
    return torch.ops.era.biased_attention(q, k, v, bias, attn_mask, causal, scale, kernel)


# --------------------------------------------------------------------------- head-dim augmentation


def augment_for_bias(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: Optional[float] = None, multiple: int = 8
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
    width = -(-(d + 1) // multiple) * multiple
    v_width = max(width, -(-v.size(-1) // multiple) * multiple)

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
