"""``era::biased_attention``: attention with a per-key log bias (LAR, ALGORITHMS.md §5.4).

After BTR merges visual tokens, anchor key ``j`` stands for ``b_j`` original tokens. LAR
(Logit-preserving Attention Rectification) restores their share of the softmax mass by adding
``phi_j = log b_j`` to every query's logit for key ``j``, in every head, in prefill and decode::

    O = softmax(Q K^T * scale + M + 1 phi^T) V        (M: causal and/or the model's own mask)

``phi`` belongs to the key (shape ``[B, Lk]``), so once cached with its key every later query
sees it. ``biased_attention`` is a ``torch.library`` custom op with a fake kernel, so a compiled
graph carries it as one opaque node (no graph break); its body picks a kernel:

==============  =====================================================  =========================
kernel          how the bias enters                                    where it runs
==============  =====================================================  =========================
``sdpa``        the reference: the bias as SDPA's additive mask,       anywhere; any mask
                beside SDPA's own causal flag where that is exact
                (CPU), else one float mask ``bias + causal + mask``
``flex``        FlexAttention ``score_mod = score + bias[b, kv]``      anywhere; eager inside
                (+ float mask), hard masks as a ``BlockMask``          the op (unfused)
``sdpa_flash``  head-dim augmentation (``flash.py``) into PyTorch's    CUDA fp16/bf16, CPU; no
                own FlashAttention backend                             mask; see ``flash.py``
``flash``       the same augmentation into ``flash_attn_func``         CUDA with flash-attn
``triton``      our kernel reads the bias vector in its online         CUDA; CPU under
                softmax (``triton_attention.py``)                      ``TRITON_INTERPRET=1``
``auto``        the fastest kernel *measured* on this device type      see ``resolve_kernel``
                for this regime that can run the call
==============  =====================================================  =========================

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
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, sym_not
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

__all__ = [
    "KERNELS",
    "biased_attention",
    "biased_attention_op",
    "default_scale",
    "kernel_unsupported",
    "resolve_kernel",
]

KERNELS = ("auto", "sdpa", "flex", "sdpa_flash", "flash", "triton")
RANKING_FILE = Path(__file__).with_name("kernel_ranking.json")


# --------------------------------------------------------------------------- validation


def _differ(a, b) -> bool:
    """True only when two sizes are known to differ. A check must never install a guard: in
    Dynamo's ShapeEnv, comparing two symbolic lengths would specialise them (every decode
    step would recompile)."""
    return statically_known_true(sym_not(sym_eq(a, b)))


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, attn_mask: Tensor | None, kernel: str) -> None:
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
        raise ValueError(f"biased_attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA")
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
        # broadcasting aligns the trailing dims: a mask of fewer dims is compared on those it has
        trailing = zip(reversed(attn_mask.shape), reversed(target), strict=False)
        ok = attn_mask.dim() <= 4 and not any(_differ(m, 1) and _differ(m, t) for m, t in trailing)
        if not ok:
            raise ValueError(
                f"biased_attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = {target}"
            )


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: ``1/sqrt(d)`` of the original head dim (never of an
    augmented one)."""
    return 1.0 / math.sqrt(head_dim)


def kernel_unsupported(kernel: str, q: Tensor, k: Tensor, attn_mask: Tensor | None, causal: bool) -> str | None:
    """Why ``kernel`` cannot run this call (device, dtype, mask, causal alignment), or None.
    Works on fake tensors without installing guards."""
    if kernel in ("sdpa", "flex"):
        return None
    if kernel == "triton":
        from . import triton_attention

        return triton_attention.unsupported(q)
    from . import flash

    Lq, Lk = q.size(2), k.size(2)
    return flash.unsupported(
        kernel, q, attn_mask, causal, statically_known_true(sym_eq(Lq, Lk)), statically_known_true(sym_eq(Lq, 1))
    )


@functools.cache
def measured_ranking(device_type: str, regime: str) -> tuple:
    """Kernels fastest first for a device type and ``prefill`` / ``decode``, as measured by
    ``benchmarks/attention.py`` and recorded in ``kernel_ranking.json``; () when never measured."""
    table = json.loads(RANKING_FILE.read_text()) if RANKING_FILE.exists() else {}
    return tuple(table.get("devices", {}).get(device_type, {}).get(regime, {}).get("ranking", ()))


def resolve_kernel(
    kernel: str, q: Tensor | None = None, k: Tensor | None = None, attn_mask: Tensor | None = None, causal: bool = False
) -> str:
    """The concrete kernel for a requested name. ``"auto"``: the fastest kernel measured on this
    device type for this regime (one query: decode; more: prefill) that can run the call; the
    reference ``sdpa`` where nothing was measured. Never a guess."""
    if kernel not in KERNELS:
        raise ValueError(f"biased_attention: unknown kernel {kernel!r}; expected one of {KERNELS}")
    if kernel != "auto":
        return kernel
    if q is None or k is None:
        return "sdpa"
    regime = "decode" if statically_known_true(sym_eq(q.size(2), 1)) else "prefill"
    for candidate in measured_ranking(q.device.type, regime):
        if kernel_unsupported(candidate, q, k, attn_mask, causal) is None:
            return candidate
    return "sdpa"


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
    gqa = q.size(1) != k.size(1)

    if _bias_only_fits_sdpa(q, bias, attn_mask, causal, Lq, Lk):
        # The bias alone, as a [B, 1, 1, Lk] mask beside SDPA's own causal flag: no [Lq, Lk] mask
        # is built and the fused kernel still skips the blocks above the diagonal (measured:
        # as fast as plain causal SDPA on CPU, benchmarks/results/attention-cpu.json).
        # (detached: inputs that require grad send SDPA to its math kernel, which refuses a mask
        # beside is_causal; this op has no backward anyway)
        out = F.scaled_dot_product_attention(
            q.detach(),
            k.detach(),
            v.detach(),
            attn_mask=_in_q_dtype(bias.detach().to(acc)[:, None, None, :], q),
            is_causal=causal and Lq > 1,
            scale=scale,
            enable_gqa=gqa,
        )
        return out.contiguous()

    # One additive mask, built in float32/float64; -inf marks "may not attend".
    mask: Tensor | None = None
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

    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        return out.contiguous()

    # A row of only -inf would make SDPA's softmax 0/0 on some backends: give it a harmless
    # 0 row and zero its output afterwards (same result as SDPA's bool-mask path and flex).
    dead_rows = torch.isneginf(mask).all(dim=-1, keepdim=True)  # [B|1, H|1, Lq|1, 1]
    mask = mask.masked_fill(dead_rows, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_in_q_dtype(mask, q), scale=scale, enable_gqa=gqa)
    return out.masked_fill(dead_rows, 0.0).contiguous()


def _in_q_dtype(mask: Tensor, q: Tensor) -> Tensor:
    """An additive float32 mask as SDPA takes it: bf16/fp16 kernels want it in q's dtype. Finite
    values are clamped (finfo(fp32).min would round to -inf) and a true -inf stays -inf."""
    if mask.dtype == q.dtype or q.dtype in (torch.float32, torch.float64):
        return mask
    finite = mask.clamp(min=torch.finfo(q.dtype).min)
    return finite.masked_fill(torch.isneginf(mask), float("-inf")).to(q.dtype)


def _bias_only_fits_sdpa(q, bias, attn_mask, causal, Lq, Lk) -> bool:
    """SDPA can take the bias as its mask and keep ``is_causal``: on CPU only (CUDA SDPA refuses
    a mask with is_causal, and without causality the general path builds the same [B,1,1,Lk]
    mask anyway, while the -inf check below would cost a device sync per call there); no model
    mask; causal only where SDPA's top-left alignment equals ours (Lq == Lk, or one query);
    and a bias with no -inf (no row can die)."""
    if bias is None or attn_mask is not None or q.device.type != "cpu":
        return False
    if causal and not (Lq == Lk or Lq == 1):
        return False
    return not bool(torch.isneginf(bias).any())


# --------------------------------------------------------------------------- flex kernel


# Dispatch keys vmap needs. A TorchDispatchMode's __torch_dispatch__ excludes them while it runs
# the op, and AOTAutograd runs every compiled graph's first call under such a mode (its
# custom-op aliasing check), so eager flex's vmap would fail there ("Cannot access storage of
# BatchedTensorImpl"). Our inputs are plain tensors, so re-enabling the keys for a fresh vmap is safe.
_FUNCTORCH_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
for _name in (
    "FuncTorchDynamicLayerFrontMode",
    "FuncTorchDynamicLayerBackMode",
    "FuncTorchBatched",
    "FuncTorchVmapMode",
    "FuncTorchGradWrapper",
    "PythonTLSSnapshot",
):
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

        def causal_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return create_block_mask(causal_mod, None, None, Lq, Lk, device=device)

    # B/H = None tells the BlockMask a size-1 mask dim broadcasts; the expanded view lets
    # mask_mod index [b, h, ...] either way.
    mask_b = None if bool_mask.size(0) == 1 else B
    mask_h = None if bool_mask.size(1) == 1 else Hq
    full_bool = bool_mask.expand(B, Hq, Lq, Lk)

    def masked_mod(b, h, q_idx, kv_idx):
        allowed = full_bool[b, h, q_idx, kv_idx]
        return (allowed & (kv_idx <= q_idx + offset)) if causal else allowed

    return create_block_mask(masked_mod, mask_b, mask_h, Lq, Lk, device=device)


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
    bias: Tensor | None,
    attn_mask: Tensor | None,
    causal: bool,
    scale: float | None,
    kernel: str,
) -> Tensor:
    """softmax(q k^T * scale + bias + masks) v; see the module docstring. Returns [B, Hq, Lq, Dv]."""
    _check_inputs(q, k, v, bias, attn_mask, kernel)
    _check_supported(kernel, q, k, attn_mask, causal)
    if scale is None:
        scale = default_scale(q.size(-1))
    kernel = resolve_kernel(kernel, q, k, attn_mask, causal)
    if kernel == "sdpa":
        return _sdpa_kernel(q, k, v, bias, attn_mask, causal, scale)
    if kernel == "flex":
        return _flex_kernel(q, k, v, bias, attn_mask, causal, scale)
    if kernel == "triton":
        from .triton_attention import triton_attention

        return triton_attention(q, k, v, bias, attn_mask, causal, scale)
    from . import flash

    run = flash.sdpa_flash_kernel if kernel == "sdpa_flash" else flash.flash_kernel
    return run(q, k, v, bias, causal, scale)


def _check_supported(kernel: str, q: Tensor, k: Tensor, attn_mask: Tensor | None, causal: bool) -> None:
    """An explicitly requested kernel that cannot run the call fails at trace time, with the reason."""
    why = None if kernel == "auto" else kernel_unsupported(kernel, q, k, attn_mask, causal)
    if why is not None:
        raise ValueError(f"biased_attention kernel={kernel!r} {why}; use kernel='auto' or 'sdpa'")


@biased_attention_op.register_fake
def _biased_attention_fake(q, k, v, bias, attn_mask, causal, scale, kernel):
    _check_inputs(q, k, v, bias, attn_mask, kernel)
    _check_supported(kernel, q, k, attn_mask, causal)
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.size(-1)))  # contiguous, like every real kernel


def biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    kernel: str = "auto",
) -> Tensor:
    """Attention with a per-key additive bias ``bias[b, j]`` (LAR).

    q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D|Dv]`` with ``Hq % Hkv == 0`` (GQA); bias
    ``[B, Lk]`` / ``[1, Lk]`` or None; attn_mask bool (True = attend) or additive float,
    broadcastable to ``[B, Hq, Lq, Lk]``; ``causal`` is end-aligned; ``scale`` defaults to
    ``1/sqrt(D)``. Returns ``[B, Hq, Lq, Dv]`` in q's dtype.
    """
    return torch.ops.era.biased_attention(q, k, v, bias, attn_mask, causal, scale, kernel)
