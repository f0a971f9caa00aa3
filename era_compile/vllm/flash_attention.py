"""LAR in vLLM's FlashAttention backend (CUDA): the augmented head of ``attention.py`` run by
FlashAttention, which takes no per-key bias either. FlashAttention runs head sizes in steps of 8 up to
256, so d = 128 runs as 136 (+6% of the KV cache and of the dot products), 64 as 72.

Written against vLLM 0.32's ``FlashAttentionImpl``; it has not run on a GPU yet (no GPU was lent to
the sessions that wrote it), so ``plugin.bridge_config`` says so when it is used. Imported only where
vLLM's platform is CUDA.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from era_compile.vllm.attention import LARPaddedImpl

FLASH_HEAD_SIZES = tuple(range(8, 257, 8))


class ERAFlashAttentionImpl(LARPaddedImpl, FlashAttentionImpl):
    HEAD_SIZES = FLASH_HEAD_SIZES

    def bind_padded_head(self, layer: Any) -> None:
        name = layer.layer_name
        if self.logits_soft_cap:
            raise ValueError(f"{name}: a soft cap would bend LAR's bias with the logits (tanh of q.k + log b)")
        if self.alibi_slopes is not None or self.sinks is not None:
            raise ValueError(f"{name}: LAR beside ALiBi or attention sinks is not built")
        if str(self.kv_cache_dtype).startswith("fp8"):
            raise ValueError(f"{name}: an fp8 KV cache would hold log b / scale to 3 bits; use --kv-cache-dtype auto")
        # FlashAttentionImpl splits its cache [.., 2 * head_size] at head_size: the padded one from now on
        self.head_size = layer.era_head_size


class ERAFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[ERAFlashAttentionImpl]:
        return ERAFlashAttentionImpl
