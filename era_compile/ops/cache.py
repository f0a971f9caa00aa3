"""era::cache_bias: the LAR bias of the keys already in a layer's KV cache.

A decode graph holds no image, so the bias of the recycled anchors cannot be recomputed
there: it was decided in prefill and travels with the cache. The runtime wrapper around
each compiled decode graph looks the bias up by the identity of the cached key tensors it
is about to pass in, and exposes it for the duration of that one call; this op reads it.
Its fake kernel gives ``[B, L]`` with the cache's own (possibly symbolic) length, so
dynamic decode graphs need no extra inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator

import torch
from torch import Tensor

_CALL_BIASES: contextvars.ContextVar[Dict[int, Tensor]] = contextvars.ContextVar("era_cache_biases")


@contextlib.contextmanager
def cache_biases(biases: Dict[int, Tensor]) -> Iterator[None]:
    """Make ``{layer: bias [B, L]}`` visible to ``era::cache_bias`` during one compiled call."""
    token = _CALL_BIASES.set(biases)
    try:
        yield
    finally:
        _CALL_BIASES.reset(token)


@torch.library.custom_op("era::cache_bias", mutates_args=())
def cache_bias(past_keys: Tensor, layer: int) -> Tensor:
    """The bias [B, L] of the L keys cached for ``layer`` (float32)."""
    biases = _CALL_BIASES.get(None)
    if biases is None or layer not in biases:
        raise RuntimeError(f"era::cache_bias: no bias provided for layer {layer}; this graph must run "
                           "through the era_compile runtime wrapper")
    bias = biases[layer]
    expected = (past_keys.shape[0], past_keys.shape[-2])
    if tuple(bias.shape) != expected:
        raise RuntimeError(f"era::cache_bias: layer {layer} bias has shape {tuple(bias.shape)}, "
                           f"its cache needs {expected}")
    return bias.to(device=past_keys.device, dtype=torch.float32).clone()


@cache_bias.register_fake
def _(past_keys, layer):
    return past_keys.new_empty((past_keys.shape[0], past_keys.shape[-2]), dtype=torch.float32)
