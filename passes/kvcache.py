"""kvcache: find each decoder layer's KV-cache write and the keys it attends to.

Hugging Face's dynamic cache appends the new keys with ``torch.cat([past, new], dim=-2)``
while Dynamo traces, and returns the result as a graph output (Dynamo stores it back into
the cache object). This pass follows each attention call's key and value arguments back
through views (GQA's ``repeat_kv`` expands and reshapes) to that ``cat``, and records:

* the graph outputs that become the layer's cache (so the runtime can attach the LAR bias
  to the cached keys), and
* the past keys: a graph input in a decode step, an empty tensor in a fresh prefill.

The graph is not changed. Layers are numbered by their module index (``...layers.3`` is
layer 3), so prefill and decode graphs agree even when a model splits its layers.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .graph import CachedLayer, PassContext, PassResult, is_attention, layer_index, tensor_meta

_PASS_THROUGH_METHODS = {"expand", "reshape", "view", "contiguous", "unsqueeze", "to"}
_PASS_THROUGH_FUNCTIONS = {torch.reshape, torch.Tensor.expand, operator.getitem}


def find_kv_cache(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("kvcache")
    outputs = list(gm.graph.output_node().args[0])
    layers = []
    for node in gm.graph.nodes:
        if not is_attention(node):
            continue
        index = layer_index(node)
        keys, values = _cache_write(node.args[1]), _cache_write(node.args[2])
        if index is None or keys is None or values is None:
            continue  # not a cached decoder attention (e.g. the vision tower)
        if keys not in outputs or values not in outputs:
            continue
        past = keys.args[0][0]
        layers.append(CachedLayer(index, node, keys, values, outputs.index(keys), outputs.index(values),
                                  past if isinstance(past, fx.Node) and past.op == "placeholder" else None))
    ctx.cache_layers = layers
    result.counts = {"cached_layers": len(layers),
                     "with_past": sum(layer.past_keys is not None for layer in layers)}
    if not layers:
        result.skipped = "no KV-cache writes (use_cache=False, or not a decoder graph)"
    return result


def _cache_write(node) -> Optional[fx.Node]:
    """The ``cat([past, new], dim=-2)`` that ``node`` is a view of, if any."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_function" and node.target is torch.cat and _is_sequence_cat(node):
            return node
        if node.op == "call_method" and node.target in _PASS_THROUGH_METHODS:
            node = node.args[0]
        elif node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS:
            node = node.args[0]
        else:
            return None
    return None


def _is_sequence_cat(node: fx.Node) -> bool:
    parts = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    out = tensor_meta(node)
    return (isinstance(parts, (list, tuple)) and len(parts) == 2 and out is not None and out.dim() == 4
            and dim in (-2, 2))
