"""CompactKV: a pruned layer's KV cache that is as long as Hugging Face expects and stores only its rows.

Hugging Face builds one decode mask for all layers, sized from layer 0's cache. Layers >= K
hold only the kept tokens (and the generated ones), so a plain compact cache would meet a
longer mask inside SDPA while Dynamo traces the next decode step, before any backend runs.
``CompactKV`` is a tensor whose *logical* length is the original one (N + t, what the mask and
``get_seq_length`` see) and whose storage is the kept rows only:

* ``rows``      [B, H, R, d]  the cached keys (or values) that exist: the kept tokens, then
                              each generated one;
* ``positions`` int64 [B, R]  the original position of each row (generated tokens: N, N+1, ...);
* ``bias``      float32 [B, R] the LAR bias of each row (``log b`` on anchors, 0 on text and
                              generated tokens; a blocked value where a row holds no token).

What Hugging Face does to a cache tensor is done to ``rows``: ``cat([cache, new], dim=-2)``
appends (the row's position is the logical length so far), repeat_kv's index/expand/reshape and
dtype or device casts apply to the rows, ``index_select`` on the batch (beam search) reorders
rows, positions and bias together; a sliding-window layer's ``x[..., -(W - 1):, :]`` keeps the
rows, blocks those before the window and counts positions from its start (``window``).
``scaled_dot_product_attention`` over CompactKV keys gathers the model's mask at the rows'
positions and adds the bias: exactly attention over the original positions with the dropped
tokens gone. The bias travels inside the cache, so a decode step needs no lookup, and a
reordered cache keeps it.

It is a traceable wrapper subclass (``__tensor_flatten__``): Dynamo traces Hugging Face's code
with it, AOTAutograd and Inductor compile its inner tensors. Anything else done to it fails
loudly, naming the op.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from era_compile.algorithms.sequence import BLOCKED

aten = torch.ops.aten
_COPIES = {aten.clone.default, aten.detach.default, aten.alias.default, aten._to_copy.default, aten.contiguous.default}


class CompactKV(Tensor):
    """See the module docstring. ``length``: the logical length (the original positions plus the
    generated ones); ``seq_dim``: which dimension of ``rows`` is the sequence (2, or 3 inside
    repeat_kv)."""

    @staticmethod
    def __new__(cls, rows: Tensor, positions: Tensor, bias: Tensor, length, seq_dim: int = 2):
        shape = list(rows.shape)
        shape[seq_dim] = length
        return Tensor._make_wrapper_subclass(cls, shape, dtype=rows.dtype, device=rows.device, requires_grad=False)

    @torch._disable_dynamo
    def __init__(self, rows: Tensor, positions: Tensor, bias: Tensor, length, seq_dim: int = 2):
        self.rows, self.positions, self.bias, self.seq_dim = rows, positions, bias, seq_dim

    # Tensor's signature (the contents are never shown); ignored override: mypy reads Tensor.__repr__'s
    # keyword argument without its name, so that no annotated override matches it
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"CompactKV(logical {tuple(self.shape)}, {self.rows.shape[self.seq_dim]} rows stored, dtype={self.dtype})"
        )

    def __tensor_flatten__(self):
        return ["rows", "positions", "bias"], (self.seq_dim,)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        (seq_dim,) = meta
        return CompactKV(inner["rows"], inner["positions"], inner["bias"], outer_size[seq_dim], seq_dim)

    def _stable_hash_for_caching(self) -> str:
        """The key AOTAutograd's and Inductor's caches use for a CompactKV input: type, logical and
        inner shapes, strides, dtypes. Without it the default pickles the (symbolic) shape, fails,
        and every decode graph is compiled without the cache."""
        parts = [type(self).__qualname__, str(self.seq_dim), str(tuple(self.shape))]
        for t in (self.rows, self.positions, self.bias):
            parts += [str(t.dtype), str(tuple(t.shape)), str(t.stride()), str(t.device)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    @property
    def stored_rows(self) -> int:
        return self.rows.shape[self.seq_dim]

    def _with_rows(self, rows: Tensor, seq_dim: int | None = None, positions=None, bias=None) -> CompactKV:
        seq_dim = self.seq_dim if seq_dim is None else seq_dim
        return CompactKV(
            rows,
            self.positions if positions is None else positions,
            self.bias if bias is None else bias,
            self.shape[self.seq_dim],
            seq_dim,
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    # ignored override: torch annotates Tensor.__torch_dispatch__ as its disabled C default, not this classmethod
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is aten.cat.default:
            return _append(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))
        x = args[0]
        if not isinstance(x, CompactKV):
            raise NotImplementedError(f"CompactKV: {func} with a CompactKV that is not its first argument")
        if func in _COPIES:
            rows = func(x.rows, *args[1:], **kwargs)
            moved = {k: v for k, v in kwargs.items() if k == "device"}
            return x._with_rows(rows, positions=x.positions.to(**moved), bias=x.bias.to(**moved))
        if func is aten.slice.Tensor:
            dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
            # under dynamic=True a window's bounds are symbols of the layer's int attributes (sliding_window,
            # sys.maxsize for an open end): constants of this model, specialised
            start, end = (int(b) if isinstance(b, torch.SymInt) else b for b in (start, end))
            dim = dim % x.dim()
            if dim != x.seq_dim:
                return x._with_rows(func(x.rows, dim, start, end, step))
            to_the_end = (
                end is None or (isinstance(end, int) and end >= 2**62) or statically_known_true(end >= x.shape[dim])
            )  # ``x[..., :]`` slices to sys.maxsize
            if step == 1 and to_the_end:  # x[..., :, :] keeps the whole sequence; a sliding-window
                # cache's x[..., -(W - 1):, :] its last W - 1 positions
                return x._with_rows(x.rows) if start in (0, None) else window(x, start)
        elif func is aten.unsqueeze.default:
            dim = args[1] % (x.dim() + 1)
            return x._with_rows(func(x.rows, dim), x.seq_dim + (dim <= x.seq_dim))
        elif func in (aten.expand.default,):
            size = list(args[1])
            offset = len(size) - x.dim()
            size[x.seq_dim + offset] = -1
            return x._with_rows(func(x.rows, size), x.seq_dim + offset)
        elif func in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            size, seq_dim = _sizes_with_stored_rows(x, list(args[1]))
            return x._with_rows(x.rows.reshape(size), seq_dim)
        elif func is aten.index_select.default and args[1] == 0:
            index = args[2]
            return x._with_rows(
                x.rows.index_select(0, index),
                positions=x.positions.index_select(0, index),
                bias=x.bias.index_select(0, index),
            )
        raise NotImplementedError(f"CompactKV does not support {func} (arguments {args[1:]}, {kwargs})")


def _append(tensors: Sequence[Tensor], dim: int) -> CompactKV:
    """``cat([cache, new...], seq dim)``: the new rows go after the stored ones, at the next
    logical positions, with bias 0."""
    cache, *new = tensors
    if not isinstance(cache, CompactKV) or any(isinstance(t, CompactKV) for t in new):
        raise NotImplementedError("CompactKV: cat must put one CompactKV first, then plain tensors")
    if dim % cache.dim() != cache.seq_dim:
        raise NotImplementedError(f"CompactKV: cat along dim {dim}, not the sequence")
    rows = torch.cat([cache.rows, *new], cache.seq_dim)
    length = cache.shape[cache.seq_dim]
    added = sum(t.shape[cache.seq_dim] for t in new)
    B = cache.positions.shape[0]
    fresh = torch.arange(length, length + added, device=cache.positions.device).expand(B, added)
    positions = torch.cat([cache.positions, fresh], 1)
    bias = torch.cat([cache.bias, cache.bias.new_zeros(B, added)], 1)
    return CompactKV(rows, positions, bias, length + added, cache.seq_dim)


def _sizes_with_stored_rows(x: CompactKV, size: list):
    """A view's target sizes in terms of the stored rows: the dimension that carries the logical
    length (the same product of dimensions before it) gets the stored count instead."""
    logical = list(x.shape)
    before = math.prod(logical[: x.seq_dim]) if x.seq_dim else 1
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = math.prod(logical) // known
    for j in range(len(size)):
        if math.prod(size[:j]) == before and size[j] == logical[x.seq_dim]:
            size[j] = x.stored_rows
            return size, j
    raise NotImplementedError(f"CompactKV: a view {size} that splits or merges the sequence of {logical}")


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """SDPA over CompactKV keys and values: the model's mask gathered at the rows' original
    positions, plus the rows' bias; causal is over the original positions too."""
    if not (isinstance(key, CompactKV) and isinstance(value, CompactKV)) or isinstance(query, CompactKV):
        raise NotImplementedError("CompactKV: attention needs CompactKV keys and values and a plain query")
    if dropout_p:
        raise NotImplementedError("CompactKV: attention with dropout")
    positions = key.positions  # [B, R]
    mask = key.bias[:, None, None, :]  # [B, 1, 1, R] float32
    if attn_mask is not None:
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        index = positions[:, None, None, :].expand(positions.shape[0], m.shape[1], m.shape[2], positions.shape[1])
        m = m.expand(positions.shape[0], -1, -1, -1).gather(3, index)
        if m.dtype == torch.bool:
            m = torch.zeros((), dtype=mask.dtype, device=m.device).masked_fill(~m, float("-inf"))
        mask = mask + m.to(mask.dtype)
    if is_causal:
        q_len, length = query.shape[-2], key.shape[key.seq_dim]
        query_positions = torch.arange(length - q_len, length, device=query.device)
        visible = positions[:, None, None, :] <= query_positions[None, None, :, None]
        mask = mask.masked_fill(~visible, float("-inf"))
    kernel = torch.ops.era.biased_attention
    return kernel(query, key.rows, value.rows, None, mask, False, scale, "sdpa")


def compact(rows: Tensor, positions: Tensor, bias: Tensor, length: int, window_start: int | None = None) -> CompactKV:
    """A fresh CompactKV: ``rows`` [B, H, R, d] at ``positions`` [B, R] of ``length`` original ones.
    ``window_start``: ``rows`` are the last R rows only, what a sliding-window layer cached of them
    (``keys[..., window_start:, :]``); positions and bias are the last R too, and the window is
    taken in original positions."""
    cached = rows.shape[-2]
    positions, bias = positions[:, positions.shape[1] - cached :], bias[:, bias.shape[1] - cached :]
    kv = CompactKV(rows.contiguous(), positions.contiguous(), bias.to(torch.float32).contiguous(), length)
    return kv if window_start is None else window(kv, window_start)


def window(x: CompactKV, start: int) -> CompactKV:
    """``x[..., start:, :]`` in original positions (HF's sliding-window cache: the last W - 1).
    Rows before the window are blocked rather than dropped (samples of a batch keep different
    numbers of rows in it); positions count from the window's start, as the sliding-window mask
    of the next step does (its ``kv_offset``). ``start`` must be an int: the runtime hands the
    cache back without its view of the graph's ``cat`` (``without_base``), so that Dynamo never
    replays that slice with symbols of its own."""
    length = x.shape[x.seq_dim]
    begin = _bound(start, length)
    positions = x.positions - begin
    bias = x.bias.masked_fill(positions < 0, BLOCKED)
    return CompactKV(x.rows, positions.clamp_min(0), bias, length - begin, x.seq_dim)


def _bound(index, length):
    """A slice bound in [0, length], as Python's slicing reads it (negative: from the end)."""
    if not isinstance(index, int):
        raise NotImplementedError(f"CompactKV: a slice bound {index!r} that is not an int")
    return torch.sym_max(index + length, 0) if index < 0 else torch.sym_min(index, length)


def without_base(x: Any) -> Any:
    """A CompactKV that is a view (a graph's ``cat[..., -(W - 1):, :]`` output, which AOTAutograd
    regenerates from its base) as a wrapper of its own, over the same inner tensors; anything else as
    it is. Dynamo fakeifies a view input by replaying the view from its base with fresh symbols of no
    source, which the window's slice cannot be taken by; the cache needs the rows, not the aliasing."""
    if isinstance(x, CompactKV) and x._is_view():
        return x._with_rows(x.rows)
    return x


def stored_rows(cache_tensor: Any) -> int:
    """How many rows a cache tensor really holds (its length for a plain tensor)."""
    return cache_tensor.stored_rows if isinstance(cache_tensor, CompactKV) else cache_tensor.shape[-2]


def _storages(cache_tensor: Any) -> list[Tensor]:
    if isinstance(cache_tensor, CompactKV):
        return [cache_tensor.rows, cache_tensor.positions, cache_tensor.bias]
    return [cache_tensor]


def stored_bytes(*cache_tensors: Any) -> int:
    """Bytes the cache tensors' storage holds (rows, positions and bias of a CompactKV), each
    storage counted once: a layer's keys and values may share their positions and bias."""
    seen: dict[tuple[int, int], int] = {}
    for t in (s for c in cache_tensors for s in _storages(c)):
        seen[(t.untyped_storage().data_ptr(), t.device.index or 0)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def cache_bytes(cache: Any) -> int:
    """What a Hugging Face cache really holds, over all its layers' keys and values."""
    return stored_bytes(*(t for layer in cache.layers for t in (layer.keys, layer.values)))
