"""layers: find the language model's decoder layers and their attention calls.

A decoder layer is found by structure, not by name: it is an indexed module
(``...layers.<i>``) that holds a ``scaled_dot_product_attention`` call *downstream of the
image merge*. The vision tower's attention runs before the merge (it produces the
features), so it is excluded without looking at any module name.

For each layer the pass records its nodes and the residual stream entering it: the one
value from outside the layer with the shape of the merged embeddings ``[B, N, D]``. Layers are
numbered by their module index. A hybrid decoder's layers that call no softmax attention (linear
attention, Mamba, short convolutions: siblings of the attention layers) are recorded by number;
from K on they run on the kept tokens like the rest, their states built from those alone. Then it
checks that the configured pruning layer K is an attention layer (a K without one has no queries
for the selection: refused, naming the attention layers). The graph is not changed.
"""

from __future__ import annotations

import torch.fx as fx

from .fx_utils import (
    hints,
    is_sdpa,
    layer_module_path,
    placeholders,
    reachable_from,
    same_shape,
    tensor_meta,
    tensor_value,
)
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .kinds import is_layer_forward
from .records import DecoderLayer, DecoderLayers, VisualSpan


@graph_pass("layers", requires=(VisualSpan,), provides=DecoderLayers)
def find_decoder_layers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    span = ctx.get(VisualSpan)
    after_merge = reachable_from([span.merge])
    attention_calls = [n for n in gm.graph.nodes if is_sdpa(n) and n in after_merge]
    if not attention_calls:
        if any(layer_module_path(n) for n in after_merge):
            raise PassError(
                "decoder layers follow the image merge but none calls scaled_dot_product_attention: "
                "load the model with attn_implementation='sdpa' (eager attention is not supported)"
            )
        raise PassError(f"{span.merge.name} carries visual tokens into this graph but no decoder layer uses it")

    paths: list[str] = []
    for call in attention_calls:
        path = layer_module_path(call)
        if path is None and is_layer_forward(gm):  # the runtime walks such layers (``saliency``), never here
            raise PassError(
                "this graph is a decoder layer's own forward (the decoder is split into per-layer "
                "graphs): its pruning is the split decoder's, layer by layer, not a carried prefill's"
            )
        if path is None:
            raise PassError(f"attention call {call.name} is not inside an indexed decoder layer module")
        if path in paths:
            raise PassError(f"decoder layer {path} holds more than one attention call")
        paths.append(path)

    other_layers = _layers_without_attention(after_merge, paths)
    members: dict[str, set] = {p: set() for p in paths}
    for node in gm.graph.nodes:
        path = layer_module_path(node)
        if path in members:
            members[path].add(node)

    residual_shape = tuple(tensor_value(span.merge).shape)  # may hold SymInts: compared without guards
    layers = []
    for path, call in zip(paths, attention_calls, strict=True):
        index = int(path.rsplit(".", 1)[1])
        nodes = members[path]
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in nodes}
        hidden = [a for a in inputs if _is_residual(a, residual_shape)]
        if len(hidden) != 1:
            raise PassError(
                f"decoder layer {path}: expected one incoming residual stream of shape "
                f"{list(hints(residual_shape))}, found {len(hidden)}"
            )
        layers.append(DecoderLayer(index, path, call, frozenset(nodes), hidden[0]))

    k = ctx.config.resolved_layer
    if all(layer.index != k for layer in layers):
        numbers = [layer.index for layer in layers]
        if k in other_layers:
            raise PassError(
                f"ERAConfig.layer={k} names a layer without softmax attention (a linear-attention, recurrent or "
                f"convolution layer of a hybrid decoder), whose queries and keys the selection cannot read: "
                f"set it to one of the attention layers {numbers}"
            )
        hybrid = f" ({len(numbers)} with softmax attention: {numbers})" if other_layers else ""
        raise PassError(
            f"ERAConfig.layer={k} but the language model has {len(numbers) + len(other_layers)} decoder layers{hybrid}"
        )
    counts = {"decoder_layers": len(layers), "prune_layer": k}
    if other_layers:
        counts["without_attention"] = len(other_layers)
    return PassResult(record=DecoderLayers(tuple(layers), frozenset(other_layers)), counts=counts)


@graph_pass("layer", provides=DecoderLayers, rewrites=False)
def find_layer_of_graph(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """A decoder layer's own graph (a decoder split into per-layer graphs, ``saliency``): its one
    attention call, numbered by the runtime in call order (``ctx.step``), and the hidden states it
    receives (an input)."""
    step = ctx.step
    calls = [n for n in gm.graph.nodes if is_sdpa(n)]
    if step is None or not is_layer_forward(gm):
        raise PassError("not a decoder layer's own graph, or no layer number for it")
    if len(calls) != 1:
        raise PassError(f"layer {step.layer}'s own graph holds {len(calls)} attention calls; expected one")
    hidden = placeholders(gm)[step.hidden_input]
    nodes = frozenset(n for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    layer = DecoderLayer(step.layer, "L['self']", calls[0], nodes, hidden)
    return PassResult(record=DecoderLayers((layer,)), counts={"layer": step.layer, "role": step.role})


def _layers_without_attention(after_merge, paths: list[str]) -> set[int]:
    """The numbers of a hybrid decoder's layers that call no softmax attention (linear attention,
    recurrences, short convolutions): the siblings of the attention layers. From K on they run on the
    kept tokens, and their states (convolution windows, recurrent states) are built from those alone."""
    parents = {p.rsplit(".", 1)[0] for p in paths}
    return {
        int(path.rsplit(".", 1)[1])
        for n in after_merge
        if (path := layer_module_path(n)) is not None and path.rsplit(".", 1)[0] in parents and path not in paths
    }


def _is_residual(node: fx.Node, shape: tuple) -> bool:
    t = tensor_meta(node)
    return t is not None and t.is_floating_point() and same_shape(t, shape)
