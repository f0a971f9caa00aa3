"""kvcache: find each decoder layer's KV-cache write and the keys it attends to.

Hugging Face's dynamic cache appends the new keys with ``torch.cat([past, new], dim=2)``
while Dynamo traces, and returns the result as a graph output (Dynamo stores it back into
the cache object). This pass follows each attention call's key and value arguments back
through whatever keeps their sequence dimension (GQA's ``repeat_kv`` expands and reshapes,
casts) to that ``cat`` (``fx_utils.sequence_source``: no op list, no hop limit), and records:

* the graph outputs that become the layer's cache (a pruned prefill's runtime turns those of
  layers >= K into ``CompactKV``, which carry the LAR bias), and
* the past keys: a graph input in a decode step (a ``CompactKV`` in a pruned layer, whose own
  attention adds the bias: ``compact``), an empty tensor in a fresh prefill.

A sliding-window cache layer attends over the ``cat`` but caches only its last W - 1 positions:
the graph output is ``cat[:, :, -(W - 1):, :]`` (``window_start``), whether or not the prompt fills
the window. In a pruned layer the runtime turns it into a ``CompactKV`` windowed in original
positions (``compact_kv.window``). A layer
that caches some other part of what it attends to is refused in a pruned prefill; in a decode
step it is still a layer over its past (a cache of two parts: the prompt's keys kept apart, which
a pruned prefill made a ``CompactKV``, and a window of the generated ones), with no output of its own.

A static cache (``generate(cache_implementation="static")``) is written in place instead
(``keys.index_copy_(2, positions, new)`` into a preallocated tensor, inside the layer).
Its slots are the original positions, so the pruned layers' keys cannot be stored compactly
there, and nothing would carry their bias: a prefill that would prune over such a cache is
refused with that reason. In other graphs the layers are listed (``written_in_place``) and
left alone.

The graph is not changed. Layers are numbered by their module index (``...layers.3`` is
layer 3), so prefill and decode graphs agree even when a model splits its layers; a decoder
layer's own graph (a decoder split per layer) by the runtime in a prefill, ``UNNUMBERED`` in a
decode step.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from era_compile.compact_kv import CompactKV

from .fx_utils import (
    attention_args,
    call_arguments,
    example_int,
    graph_outputs,
    is_attention,
    is_cat,
    is_in_place,
    layer_index,
    sequence_source,
    tensor_meta,
)
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .kinds import GraphKind, is_layer_forward
from .records import CachedLayer, KVCache

# A decode step of a decoder split into per-layer graphs: the layer's own graph names no index, and
# no prefill's walk numbers it (its cache, a CompactKV where the prefill pruned, adds the bias)
UNNUMBERED = -1


@graph_pass("kvcache", provides=KVCache)
def find_kv_cache(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    outputs = graph_outputs(gm)
    layers: list[CachedLayer] = []
    partly_cached: list[int] = []  # layers caching part of what they attend to, not a window
    # a KV cache written in place is an attention layer's: a hybrid decoder's linear or recurrent layers
    # update their states in place, states they build from whatever tokens they run on
    attending = {layer_index(n) for n in gm.graph.nodes if is_attention(n)}
    written_in_place = (layer_index(n) for n in gm.graph.nodes if _writes_in_place(n))
    in_place = sorted({i for i in written_in_place if i is not None and i in attending})
    unnumbered_decode = ctx.kind is GraphKind.DECODE and is_layer_forward(gm)  # asked once, of decode graphs only
    for node in gm.graph.nodes:
        if not is_attention(node):
            continue
        index = layer_index(node)
        if index is None and ctx.step is not None:  # a decoder layer's own graph: the runtime numbers it
            index = ctx.step.layer
        elif index is None and unnumbered_decode:  # a split decoder's decode step: no number known
            index = UNNUMBERED
        if index is None or index in in_place:
            continue  # not a decoder attention (e.g. the vision tower), or over a static cache
        args = attention_args(node)
        keys, values = sequence_source(args["key"]), sequence_source(args["value"])
        if not (_is_cache_write(keys) and _is_cache_write(values)):
            continue
        cached_keys, cached_values, start = keys, values, None
        if keys not in outputs or values not in outputs:  # attends over the cat, caches part of it
            (cached_keys, start), (cached_values, value_start) = _window_of(keys, outputs), _window_of(values, outputs)
            if start is None or start != value_start:
                partly_cached.append(index)
                cached_keys = cached_values = start = None
        past = sequence_source(call_arguments(keys)["tensors"][0])
        past = past if isinstance(past, fx.Node) and past.op == "placeholder" else None
        layers.append(
            CachedLayer(
                index,
                keys,
                values,
                _position(outputs, cached_keys),
                _position(outputs, cached_values),
                past,
                compact=past is not None and isinstance(tensor_meta(past), CompactKV),
                window_start=start,
            )
        )
    _refuse_if_pruned(
        ctx,
        in_place,
        "write their KV cache in place (index_copy_ into a preallocated cache: "
        "generate(cache_implementation='static') or a StaticCache), whose slots are the original "
        "positions: the pruned layers' keys and their bias cannot be cached there; not supported, "
        "use the default dynamic cache",
    )
    _refuse_if_pruned(
        ctx,
        partly_cached,
        "cache part of the keys they attend to, not as a sliding window "
        "(keys[..., -(W - 1):, :]) of them: the pruned layers' cache cannot be kept; not supported",
    )
    if ctx.step is not None and ctx.step.role != "saliency":
        windowed = any(c.window_start is not None for c in layers)
        if windowed or partly_cached or any(_writes_in_place(n) for n in gm.graph.nodes):
            raise PassError(
                f"layer {ctx.step.layer}, a graph of its own in a decoder split per layer, caches a "
                "window or a part of its keys or writes its cache in place: its pruned cache cannot be "
                "kept; not supported"
            )
    record = KVCache(tuple(layers), tuple(in_place))
    counts = {
        "cached_layers": len(layers),
        "with_past": sum(layer.past_keys is not None for layer in layers),
        "compact": [layer.index for layer in layers if layer.compact],
    }
    if in_place:
        counts["written_in_place"] = list(in_place)
    skipped = None if layers else "no KV-cache writes (use_cache=False, or not a decoder graph)"
    return PassResult(record=record, counts=counts, skipped=skipped)


def _position(outputs: list, node: fx.Node | None) -> int | None:
    return None if node is None else outputs.index(node)


def _refuse_if_pruned(ctx: PassContext, layers: list[int], why: str) -> None:
    """A prefill that prunes cannot keep these layers' caches when any of them is pruned (>= K)."""
    pruned = [i for i in layers if i >= ctx.config.resolved_layer]
    if ctx.kind.has_image and pruned:
        raise PassError(f"layers {pruned} {why}")


def _window_of(cat: fx.Node, outputs: list):
    """(output, start) when an output is ``cat[:, :, start:, :]`` (a sliding-window cache's write),
    else (None, None)."""
    for user in cat.users:
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if (
            user in outputs
            and isinstance(index, tuple)
            and len(index) in (3, 4)
            and all(i == slice(None) for j, i in enumerate(index) if j != 2)
        ):
            window = index[2]
            # -(W - 1); under dynamic=True computed in the graph from the layer's sliding_window (an int
            # Dynamo makes an input: this model's, the same on every call), taken at its example
            start = example_int(window.start) if isinstance(window, slice) else None
            if isinstance(start, int) and window.stop is None and window.step in (None, 1):
                return user, start
    return None, None


def _is_cache_write(node) -> bool:
    """``cat([past, new], dim=2)`` of 4-D tensors."""
    if not (isinstance(node, fx.Node) and is_cat(node)):
        return False
    args, out = call_arguments(node), tensor_meta(node)
    return len(args["tensors"]) == 2 and out is not None and out.dim() == 4 and args["dim"] == 2


def _writes_in_place(node: fx.Node) -> bool:
    """``cache.index_copy_(2, positions, new)`` / ``cache[..., positions, :] = new`` into a 4-D float
    tensor: a static cache's write (a graph input, or in a prefill the buffer the graph just
    allocated for it), which the layer's attention then reads a slice of."""
    writes = is_in_place(node) or (node.op == "call_function" and node.target is operator.setitem)
    value = tensor_meta(node.args[0]) if writes and node.args else None
    return value is not None and value.dim() == 4 and value.is_floating_point()
