"""era::biased_attention and augment_for_bias against explicit float64 softmax references.

ALGORITHMS.md §9 test 1 (head-dim augmentation = key bias) and the kernel contract of
era_compile/ops/attention.py: every kernel, fp32 and bf16, padding biases, end-aligned causal,
GQA, model masks, fake kernel under opcheck and a fullgraph Inductor compile.

Tests marked ``cuda`` run on CUDA tensors where a GPU is present (else on CPU): scripts/gpu-check.sh
runs them, with those marked ``gpu`` (CUDA only), on a lent GPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from era_compile.ops.attention import RANKING_FILE, biased_attention, kernel_unsupported, resolve_kernel
from era_compile.ops.flash import augment_for_bias

FP32_MIN = torch.finfo(torch.float32).min
MAX_LOG_COUNT = math.log(2880)  # LLaVA-NeXT: up to 2880 visual tokens merged into one anchor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32, seed=0, strided=False):
    """Random q, k, v as [B, H, L, D]. strided: transposed views of [B, L, H, D] tensors, the
    layout a model's projections hand to attention (kernels must read strides, not assume them)."""
    g = _gen(seed)
    if strided:
        q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(B, Lk, Hkv, Dv or D, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, Hkv, Lk, Dv or D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _log_count_bias(B, Lk, seed=1):
    """phi = log(count): 0 for text keys, up to log(2880) for anchors (the largest one pinned)."""
    g = _gen(seed)
    counts = torch.randint(1, 2881, (B, Lk), generator=g).double()
    counts[:, ::3] = 1.0  # text / system keys: phi = 0
    counts[:, 1] = 2880.0
    return counts.log().float()


def reference(q, k, v, bias=None, attn_mask=None, causal=False, scale=None):
    """softmax(q k^T * scale + bias + masks) v in float64, GQA by repetition, end-aligned causal.

    Rows with no attendable key give zeros (the op's documented convention).
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + bias.double()[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, -math.inf)
        else:
            logits = logits + attn_mask.double()
    if causal:
        i = torch.arange(Lq)[:, None]
        j = torch.arange(Lk)[None, :]
        logits = logits.masked_fill(j > i + (Lk - Lq), -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    weights = torch.exp(logits - row_max.masked_fill(dead, 0.0))
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return weights @ v


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- §9 test 1: augmentation


def _aug_reference(q, k, v, phi, causal, scale):
    return reference(q, k, v, bias=phi, causal=causal, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
def test_augmentation_equals_key_bias_float64(causal):
    B, H, L, d = 2, 3, 10, 16
    q, k, v = _qkv(B, H, H, L, L, d, dtype=torch.float64, seed=10)
    phi = torch.rand(B, L, generator=_gen(11), dtype=torch.float64) * 3.0  # phi up to ~3

    q_aug, k_aug, v_aug, scale = augment_for_bias(q, k, v, phi)
    assert q_aug.shape[-1] == d + 8 and k_aug.shape[-1] == d + 8 and v_aug.shape[-1] == d + 8
    assert scale == pytest.approx(1.0 / math.sqrt(d))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, is_causal=causal, scale=scale)[..., :d]

    ref = _aug_reference(q, k, v, phi, causal, 1.0 / math.sqrt(d))
    assert (out - ref).abs().max().item() < 1e-12


def test_augmentation_zero_bias_is_plain_attention():
    q, k, v = _qkv(2, 3, 3, 9, 9, 16, dtype=torch.float64, seed=12)
    q_aug, k_aug, v_aug, scale = augment_for_bias(q, k, v, torch.zeros(2, 9, dtype=torch.float64))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, is_causal=True, scale=scale)[..., :16]
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - plain).abs().max().item() < 1e-12


def test_augmentation_default_scale_is_wrong():
    """The kernel's own default 1/sqrt(d+p) is the §5.5 pitfall: a clearly visible error."""
    B, H, L, d = 2, 3, 10, 16
    q, k, v = _qkv(B, H, H, L, L, d, dtype=torch.float64, seed=10)
    phi = torch.rand(B, L, generator=_gen(11), dtype=torch.float64) * 3.0
    q_aug, k_aug, v_aug, _ = augment_for_bias(q, k, v, phi)
    wrong = F.scaled_dot_product_attention(q_aug, k_aug, v_aug)[..., :d]  # scale = 1/sqrt(24)
    ref = _aug_reference(q, k, v, phi, False, 1.0 / math.sqrt(d))
    assert (wrong - ref).abs().max().item() > 1e-3


def test_augmentation_custom_scale_and_gqa():
    """With scale s the column is bias/s; the column goes on every KV head (GQA 4:1)."""
    B, Hq, Hkv, Lq, Lk, d = 2, 8, 2, 5, 12, 16
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, d, dtype=torch.float64, seed=13)
    phi = _log_count_bias(B, Lk).double()
    s = 0.3
    q_aug, k_aug, v_aug, scale = augment_for_bias(q, k, v, phi, scale=s)
    assert scale == s
    assert torch.equal(k_aug[:, 0, :, d], k_aug[:, 1, :, d])
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=scale, enable_gqa=True)[..., :d]
    ref = reference(q, k, v, bias=phi, scale=s)
    assert (out - ref).abs().max().item() < 1e-12


def test_augmentation_widths_and_broadcast_bias():
    q, k, v = _qkv(2, 2, 2, 3, 7, 128, Dv=128, dtype=torch.float32, seed=14)
    phi = _log_count_bias(1, 7)  # [1, Lk] broadcasts over the batch
    q_aug, k_aug, v_aug, scale = augment_for_bias(q, k, v, phi)
    assert q_aug.shape[-1] == k_aug.shape[-1] == v_aug.shape[-1] == 136
    assert torch.equal(q_aug[..., :128], q) and torch.equal(v_aug[..., :128], v)
    assert torch.all(q_aug[..., 128] == 1) and torch.all(q_aug[..., 129:] == 0)
    assert torch.allclose(k_aug[:, :, :, 128], (phi * math.sqrt(128)).expand(2, 7)[:, None, :].expand(2, 2, 7))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=scale)[..., :128]
    assert rel_err(out, reference(q, k, v, bias=phi)) < 1e-5


# --------------------------------------------------------------------------- the op vs float64


def _case(name, dtype):
    """(q, k, v, kwargs) for one scenario; all inputs random."""
    B, Hq, Hkv, D = 2, 4, 4, 16
    if name == "log_counts":
        q, k, v = _qkv(B, Hq, Hkv, 12, 12, D, dtype=dtype, seed=20)
        return q, k, v, dict(bias=_log_count_bias(B, 12))
    if name == "padding_biases":
        q, k, v = _qkv(B, Hq, Hkv, 12, 12, D, dtype=dtype, seed=21)
        bias = _log_count_bias(B, 12)
        bias[0, 4] = -1e4  # padding key, HF -1e4 style
        bias[1, 7] = FP32_MIN  # padding key, finfo.min style
        bias[1, 8] = FP32_MIN
        return q, k, v, dict(bias=bias)
    if name == "causal_decode":
        q, k, v = _qkv(B, Hq, Hkv, 1, 12, D, dtype=dtype, seed=22)
        return q, k, v, dict(bias=_log_count_bias(B, 12), causal=True)
    if name == "causal_chunk":
        q, k, v = _qkv(B, Hq, Hkv, 5, 12, D, dtype=dtype, seed=23)
        return q, k, v, dict(bias=_log_count_bias(B, 12), causal=True)
    if name == "gqa_4to1":
        q, k, v = _qkv(B, 8, 2, 5, 12, D, dtype=dtype, seed=24)
        return q, k, v, dict(bias=_log_count_bias(B, 12), causal=True)
    if name == "bool_mask_padded_key":
        q, k, v = _qkv(B, Hq, Hkv, 5, 12, D, dtype=dtype, seed=25)
        mask = torch.ones(B, 1, 5, 12, dtype=torch.bool)
        mask[1, :, :, 2] = False  # batch row 1 is left-padded at key 2
        return q, k, v, dict(bias=_log_count_bias(B, 12), attn_mask=mask, causal=True)
    if name == "float_mask_hf_style":
        q, k, v = _qkv(B, Hq, Hkv, 6, 12, D, dtype=dtype, seed=26)
        mask = torch.zeros(B, 1, 6, 12, dtype=dtype)
        mask[0, :, :, 3] = torch.finfo(dtype).min
        return q, k, v, dict(bias=_log_count_bias(B, 12), attn_mask=mask, causal=True)
    if name == "bias_1xLk_broadcast":
        q, k, v = _qkv(B, Hq, Hkv, 7, 12, D, dtype=dtype, seed=27)
        return q, k, v, dict(bias=_log_count_bias(1, 12))
    if name == "dead_query_row":
        q, k, v = _qkv(B, Hq, Hkv, 6, 12, D, dtype=dtype, seed=28)
        mask = torch.ones(B, 1, 6, 12, dtype=torch.bool)
        mask[1, :, 0, :] = False  # a padding query: attends nothing
        return q, k, v, dict(bias=_log_count_bias(B, 12), attn_mask=mask)
    if name == "causal_more_queries_than_keys":
        q, k, v = _qkv(B, Hq, Hkv, 6, 4, D, dtype=dtype, seed=29)  # first 2 queries see no key
        return q, k, v, dict(bias=_log_count_bias(B, 4), causal=True)
    if name == "no_bias_custom_scale_dv":
        q, k, v = _qkv(B, 8, 2, 5, 12, D, Dv=24, dtype=dtype, seed=30)
        return q, k, v, dict(causal=True, scale=0.2)
    # Longer than one tile (the triton kernel's blocks are 64 queries by 64 keys on CUDA, 32 keys
    # on CPU): the online softmax rescales across key blocks, causal programs stop early, the
    # last blocks are partial. LLaVA-7B's head dim.
    if name == "long_causal_multiblock":
        q, k, v = _qkv(B, 4, 1, 150, 150, 128, dtype=dtype, seed=31)  # GQA 4:1
        bias = _log_count_bias(B, 150)
        bias[1, 100] = -1e4  # a padding key in the third key block
        return q, k, v, dict(bias=bias, causal=True)
    if name == "long_strided_chunk":
        q, k, v = _qkv(B, 4, 4, 70, 200, 64, dtype=dtype, seed=32, strided=True)
        return q, k, v, dict(bias=_log_count_bias(B, 200))
    raise KeyError(name)


CASES = [
    "log_counts",
    "padding_biases",
    "causal_decode",
    "causal_chunk",
    "gqa_4to1",
    "bool_mask_padded_key",
    "float_mask_hf_style",
    "bias_1xLk_broadcast",
    "dead_query_row",
    "causal_more_queries_than_keys",
    "no_bias_custom_scale_dv",
    "long_causal_multiblock",
    "long_strided_chunk",
]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPUTE_KERNELS = ["sdpa", "flex", "sdpa_flash", "flash", "triton"]


def _on_device(q, k, v, kw):
    move = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # keeps a transposed layout
    return move(q), move(k), move(v), {key: move(val) for key, val in kw.items()}


def _reference_of(q, k, v, kw):
    return reference(
        q.cpu(),
        k.cpu(),
        v.cpu(),
        **{key: val.cpu() if isinstance(val, torch.Tensor) else val for key, val in kw.items()},
    )


def _skip_unless_runs(kernel, q, k, kw):
    """Skip (with the op's own reason) where a kernel cannot run this call on this machine."""
    if kernel == "triton" and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        pytest.skip("the Triton CPU interpreter has no bfloat16 (tested on CUDA)")
    why = kernel_unsupported(kernel, q, k, kw.get("attn_mask"), kw.get("causal", False))
    if why is not None:
        pytest.skip(f"{kernel}: {why}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kernel", COMPUTE_KERNELS)
@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_float64_reference(name, kernel, dtype):
    if dtype == torch.float16 and kernel in ("sdpa", "flex"):
        pytest.skip("fp16 is covered by bf16 for the reference kernels")
    q, k, v, kw = _on_device(*_case(name, dtype))
    assert q.device.type == DEVICE
    assert q.is_contiguous() == (not name.startswith("long_strided"))  # the device copy keeps the layout
    _skip_unless_runs(kernel, q, k, kw)
    out = biased_attention(q, k, v, kernel=kernel, **kw)
    assert out.dtype == dtype
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), _reference_of(q, k, v, kw)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the check that a GPU run skips no kernel)")
def test_cuda_runs_every_kernel():
    """On a GPU the comparisons above must run each kernel on CUDA tensors in each dtype it
    supports: a kernel that cannot (triton not installed, no flash SDPA in this torch) would
    otherwise turn its cases into quiet skips. The flash-attn package is optional."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, _ = _qkv(1, 4, 4, 8, 8, 128, dtype=dtype)
        q, k = q.cuda(), k.cuda()
        for kernel in COMPUTE_KERNELS:
            why = kernel_unsupported(kernel, q, k, None, True)
            if kernel in ("sdpa_flash", "flash") and dtype == torch.float32:
                assert why is not None and "fp16 or bf16" in why, why  # flash kernels are half precision only
            elif kernel == "flash" and why is not None:
                assert "flash-attn package" in why, why
            else:
                assert why is None, f"{kernel} {dtype}: {why}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["long_causal_multiblock", "causal_decode", "bool_mask_padded_key"])
def test_auto_kernel_matches_float64_reference(name, dtype):
    """kernel="auto" on this device: the kernel the measured ranking picks (on a GPU,
    scripts/gpu-check.sh runs this again after benchmarks/attention.py --update-ranking) runs
    the call and matches float64."""
    q, k, v, kw = _on_device(*_case(name, dtype))
    picked = resolve_kernel("auto", q, k, kw.get("attn_mask"), kw.get("causal", False))
    assert kernel_unsupported(picked, q, k, kw.get("attn_mask"), kw.get("causal", False)) is None
    _skip_unless_runs(picked, q, k, kw)
    out = biased_attention(q, k, v, kernel="auto", **kw)
    assert rel_err(out.cpu(), _reference_of(q, k, v, kw)) <= TOL[dtype]


@pytest.mark.cuda
def test_triton_kernel_is_tested_in_ci():
    """CI installs triton (the [test] extra) and runs its kernel under TRITON_INTERPRET=1: a
    missing install must not turn every triton case into a quiet skip."""
    q, k, _ = _qkv(1, 2, 2, 3, 3, 16)
    why = kernel_unsupported("triton", q.to(DEVICE), k.to(DEVICE), None, False)
    if os.environ.get("CI"):
        assert why is None, why


def test_explicit_kernel_that_cannot_run_says_why():
    q, k, v, kw = _case("bool_mask_padded_key", torch.float32)
    with pytest.raises(ValueError, match="kernel='sdpa_flash' takes no attention mask"):
        biased_attention(q, k, v, kernel="sdpa_flash", **kw)


def test_bias_changes_the_output():
    """Guards the reference comparisons: dropping the bias is far outside the tolerance."""
    q, k, v, kw = _case("log_counts", torch.float32)
    assert rel_err(biased_attention(q, k, v), reference(q, k, v, **kw)) > 0.1


def test_dead_query_row_is_zero_and_others_unchanged():
    q, k, v, kw = _case("dead_query_row", torch.float32)
    for kernel in ("sdpa", "flex", "triton"):
        if kernel_unsupported(kernel, q, k, kw["attn_mask"], False):
            continue
        out = biased_attention(q, k, v, kernel=kernel, **kw)
        assert torch.all(out[1, :, 0] == 0)
        assert out[1, :, 1:].abs().sum() > 0


@pytest.mark.cuda
def test_auto_follows_the_recorded_measurements():
    """kernel="auto" reads kernel_ranking.json, which benchmarks/attention.py writes from a
    recorded run: each ranking must be that run's order (fastest biased / plain first), and auto
    on this machine's devices picks the first of its device type's that can run the call (sdpa
    where that type was never measured)."""
    table = json.loads(RANKING_FILE.read_text())
    assert "cpu" in table["devices"]
    root = Path(__file__).resolve().parent.parent
    for regimes in table["devices"].values():
        for regime, entry in regimes.items():
            recorded = json.loads((root / entry["source"]).read_text())
            geo = recorded["ranking"][regime]["geomean_ratio"]
            assert entry["ranking"] == sorted(geo, key=geo.get)
    for device in sorted({"cpu", DEVICE}):
        measured = table["devices"].get(device, {})
        for Lq, regime in ((5, "prefill"), (1, "decode")):
            q, k, v = (t.to(device) for t in _qkv(1, 4, 4, Lq, 12, 16))
            ranking = measured.get(regime, {}).get("ranking", [])
            runnable = [c for c in ranking if kernel_unsupported(c, q, k, None, True) is None]
            assert resolve_kernel("auto", q, k, None, True) == (runnable[0] if runnable else "sdpa")
            # a mask rules out the augmented kernels: auto then picks the best kernel that takes one
            mask = torch.ones(1, 1, Lq, 12, dtype=torch.bool, device=device)
            assert kernel_unsupported(resolve_kernel("auto", q, k, mask, True), q, k, mask, True) is None


# --------------------------------------------------------------------------- fake kernel / compile


@pytest.mark.parametrize(
    "name,kernel",
    [
        ("causal_chunk", "sdpa"),
        ("bool_mask_padded_key", "sdpa"),
        ("no_bias_custom_scale_dv", "sdpa"),
        ("gqa_4to1", "flex"),
    ],
)
def test_opcheck(name, kernel):
    q, k, v, kw = _case(name, torch.float32)
    args = (q, k, v, kw.get("bias"), kw.get("attn_mask"), kw.get("causal", False), kw.get("scale"), kernel)
    torch.library.opcheck(torch.ops.era.biased_attention.default, args)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_inductor_fullgraph_matches_eager(kernel):
    def layer(q, k, v, bias):
        # RoPE-like pre-processing and an output projection around the op: Inductor compiles
        # real code on both sides; fullgraph=True fails on any graph break.
        out = biased_attention(q * 0.5 + 0.1, k.sin(), v, bias, causal=True, kernel=kernel)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1) * 2.0

    q, k, v = _qkv(2, 8, 2, 5, 12, 16, seed=40)
    bias = _log_count_bias(2, 12)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    want = layer(q, k, v, bias)
    # The first call of a compiled graph runs under AOTAutograd's custom-op aliasing
    # TorchDispatchMode (eager flex's vmap must survive it); the second is the steady state.
    for _ in range(2):
        assert torch.allclose(compiled(q, k, v, bias), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, layer(q, k, v, None), atol=1e-3)  # the bias matters here


def test_flex_runs_under_a_dispatch_mode():
    """FlopCounterMode (any TorchDispatchMode) must not break eager flex's vmap inside the op."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, kw = _case("bool_mask_padded_key", torch.float32)
    with FlopCounterMode(display=False):
        out = biased_attention(q, k, v, kernel="flex", **kw)
    assert rel_err(out, reference(q, k, v, **kw)) <= 1e-5


# --------------------------------------------------------------------------- bad input


def test_unknown_kernel_raises():
    q, k, v = _qkv(1, 2, 2, 3, 3, 8)
    with pytest.raises(ValueError, match="unknown kernel 'flash9'"):
        biased_attention(q, k, v, kernel="flash9")


def test_heads_not_divisible_raises():
    q, k, v = _qkv(1, 6, 4, 3, 3, 8)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        biased_attention(q, k, v)


def test_bad_bias_and_mask_shapes_raise():
    q, k, v = _qkv(2, 2, 2, 3, 5, 8)
    with pytest.raises(ValueError, match="bias must be"):
        biased_attention(q, k, v, torch.rand(2, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        biased_attention(q, k, v, attn_mask=torch.ones(3, 1, 3, 5, dtype=torch.bool))


def test_inputs_that_require_grad_take_the_same_path():
    """A bias computed from weights requires grad; SDPA then picks its math kernel, which refuses a
    mask beside is_causal. The op is inference-only: it gives the no-grad result."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 10, 8, generator=g)
    bias = torch.rand(1, 10, generator=g)
    expected = biased_attention(q, q, q, bias, causal=True, kernel="sdpa")
    out = biased_attention(q.clone().requires_grad_(), q, q, bias.clone().requires_grad_(), causal=True, kernel="sdpa")
    assert torch.allclose(out, expected)
