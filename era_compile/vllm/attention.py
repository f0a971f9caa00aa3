"""LAR in vLLM's CPU attention: each anchor's ``log b`` added to its key's logits, for every query, in
prefill and every decode step, through vLLM's own paged-attention kernel.

The kernel takes no per-key bias, so the bias rides in the head dimension (DESIGN: "LAR as an
augmented head"): with d' the next head size the kernel runs,

    q' = [q, 1, 0...]    k' = [k, log b / scale, 0...]    v' = [v, 0...]

gives q'.k' * scale = q.k * scale + log b and the same weighted sum of v. The bias is written into the
paged cache with its key, so whatever vLLM does to a cached block (prefix caching, preemption and
recompute, chunked prefill) carries it, with no side table to keep in step. The cost is the padding:
d = 64 runs as 80 (+25% of the KV cache and of the attention's dot products), 128 as 160.

Inert unless a model marked its attention layers (``mark_layers``): the backend class replaces vLLM's
``CPU_ATTN`` for the whole process, and an unmarked layer runs vLLM's code unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

# Head sizes vLLM 0.32's CPU attention kernel runs (cpu_attn.py, get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class StepBias:
    """One model's ``log b`` for the tokens of the step being run, in the step's token order (None:
    every token's is 0). Set by the model as it embeds the step's tokens, read by its attention layers.
    ``positions``: (mask of the step's kept image tokens, their own positions), for a model whose
    positions it supplies (M-RoPE)."""

    log_bias: Tensor | None = None
    positions: tuple[Tensor, Tensor] | None = None


def mark_layers(model: torch.nn.Module, step: StepBias) -> int:
    """Mark ``model``'s decoder attention layers to run LAR from ``step`` and declare their padded
    KV-cache head size to vLLM. Returns how many were marked."""
    from vllm.model_executor.layers.attention.attention import Attention

    marked = 0
    for module in model.modules():
        if not isinstance(module, Attention) or module.attn_type != "decoder":
            continue
        if module.sliding_window is not None:
            raise ValueError(f"{module.layer_name}: LAR on a sliding-window layer is not built in the vLLM plugin yet")
        if module.head_size != module.head_size_v:
            raise ValueError(f"{module.layer_name}: LAR needs equal key and value head sizes")
        impl = module.impl
        if not isinstance(impl, LARPaddedImpl):
            raise ValueError(
                f"{module.layer_name}: vLLM chose the {type(impl).__name__} attention, which does not run LAR "
                "(the plugin wraps CPU_ATTN and FLASH_ATTN)"
            )
        module.era_step = step
        module.era_head_size = impl.augmented_head_size(module.head_size)
        impl.bind_padded_head(module)
        module.get_kv_cache_spec = _padded_spec.__get__(module)
        marked += 1
    return marked


def _padded_spec(self: Any, vllm_config: Any) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = type(self).get_kv_cache_spec(self, vllm_config)
    if type(spec) is not FullAttentionSpec:
        raise ValueError(
            f"{self.layer_name}: LAR's padded cache is built for full attention, got {type(spec).__name__}"
        )
    return dataclasses.replace(spec, head_size=self.era_head_size, head_size_v=self.era_head_size)


def _pad(x: Tensor, size: int, column: Tensor | float | None = None) -> Tensor:
    """``x`` [N, H, d] widened to [N, H, size] with zeros, and ``column`` (per token, or a constant)
    written at index d."""
    out = x.new_zeros(*x.shape[:-1], size)
    out[..., : x.shape[-1]] = x
    if column is not None:
        out[..., x.shape[-1]] = column[:, None] if isinstance(column, Tensor) else column
    return out


class LARPaddedImpl:
    """Before a vLLM attention impl in the bases: pads the marked layers' q, k, v as the module
    docstring says and runs the impl on the padded head; unmarked layers run the impl unchanged."""

    scale: float
    HEAD_SIZES: tuple[int, ...] = ()

    @classmethod
    def augmented_head_size(cls, head_size: int) -> int:
        """The smallest head size the kernel runs that has room for the bias column."""
        for size in cls.HEAD_SIZES:
            if size > head_size:
                return size
        raise ValueError(f"head size {head_size}: {cls.__name__}'s kernel has no larger size to carry LAR's bias")

    def bind_padded_head(self, layer: Any) -> None:
        """Called once when ``layer`` is marked, before its cache exists."""

    def do_kv_cache_update(
        self, layer: Any, key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor
    ) -> None:
        step = getattr(layer, "era_step", None)
        if step is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)  # type: ignore[misc]
        size = layer.era_head_size
        column = torch.zeros(key.shape[0], dtype=key.dtype, device=key.device)
        if step.log_bias is not None:
            n = min(key.shape[0], step.log_bias.shape[0])
            column[:n] = step.log_bias[:n].to(key.dtype) / self.scale
        super().do_kv_cache_update(layer, _pad(key, size, column), _pad(value, size), kv_cache, slot_mapping)  # type: ignore[misc]

    def forward(
        self,
        layer: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_cache: Tensor,
        attn_metadata: Any,
        output: Tensor,
        output_scale: Tensor | None = None,
        output_block_scale: Tensor | None = None,
    ) -> Tensor:
        base = super().forward  # type: ignore[misc]
        if getattr(layer, "era_step", None) is None or attn_metadata is None:
            return base(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        size = layer.era_head_size
        wide = output.new_empty(*output.shape[:-1], size)
        base(layer, _pad(query, size, 1.0), key, value, kv_cache, attn_metadata, wide)
        output.copy_(wide[..., : output.shape[-1]])
        return output


class ERACPUAttentionImpl(LARPaddedImpl, CPUAttentionBackendImpl):
    HEAD_SIZES = CPU_HEAD_SIZES


class ERACPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[ERACPUAttentionImpl]:
        return ERACPUAttentionImpl

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(CPU_HEAD_SIZES)
