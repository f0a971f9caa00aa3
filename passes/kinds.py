"""The one classifier: what kind of graph Dynamo handed over, which decides the passes it gets.

Backend, pass manager and runtime all read this answer; nothing else decides it. It runs on
a normalised graph (``normalize`` first), so it matches one spelling of each op.

=========  =========================================================  ==============================
kind       what the graph holds                                       passes (``manager.PIPELINES``)
=========  =========================================================  ==============================
prefill    an image merge and decoder layers after it                 span layers kvcache prune
                                                                      attention publish
handoff    an image merge and no decoder layer after it (Dynamo       span handoff
           split the forward): its mask is handed on
carried    decoder layers on merged embeddings an earlier graph       span layers kvcache prune
           handed on (decided per call by the runtime: ``carried``)   attention publish
decode     attention over a past KV cache, no image merge             kvcache (which layers attend
                                                                      over a pruned CompactKV cache)
text       none of these: a text-only prompt, a vision tower, a head  none
=========  =========================================================  ==============================

Apart from its kind, a graph may *encode images* (``image_values``: a vision tower's patch
convolution, or a pixel input) and may *run decoder layers* (``runs_decoder_layers``). The
runtime then checks that a graph prunes each image before a language model has run past it;
and a text-kind graph that encodes images and feeds them to decoder layers
(``decoder_layers_fed``) merges them by a pattern the passes do not know: the backend falls
back, loudly.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .analysis import analysis_of, computed_from, is_float
from .fx_utils import (
    attention_args,
    call_arguments,
    is_attention,
    is_cat,
    is_masked_scatter,
    is_weight,
    layer_module_path,
    same_shape,
    same_size,
    sequence_source,
    tensor_meta,
)

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}


class GraphKind(enum.Enum):
    PREFILL = "prefill"
    HANDOFF = "handoff"
    CARRIED = "carried"
    DECODE = "decode"
    TEXT = "text"
    # variants of a decoder layer's own graph on an image prompt's way through a split decoder
    # (``records.LayerStep``), chosen per call by the runtime, never by ``classify``
    LAYER_SALIENCY = "layer_saliency"
    LAYER_PRUNE = "layer_prune"
    LAYER_KEPT = "layer_kept"

    @property
    def has_image(self) -> bool:
        return self in (GraphKind.PREFILL, GraphKind.HANDOFF, GraphKind.CARRIED, GraphKind.LAYER_PRUNE)

    @property
    def may_receive_embeddings(self) -> bool:
        """Graphs an earlier graph's merged embeddings can reach (the runtime checks per call)."""
        return self in (GraphKind.DECODE, GraphKind.TEXT)

    @staticmethod
    def of_layer_step(role: str) -> GraphKind:
        return {"saliency": GraphKind.LAYER_SALIENCY, "prune": GraphKind.LAYER_PRUNE, "kept": GraphKind.LAYER_KEPT}[
            role
        ]


def classify(gm: fx.GraphModule, carried: Any | None = None, example_inputs=()) -> GraphKind:
    """The kind of a normalised graph; ``carried``: the visual mask that reached one of its inputs."""
    if carried is not None:
        return GraphKind.CARRIED
    merges = [n for n in gm.graph.nodes if is_masked_scatter(n) or is_unfolded_assignment(n)]
    merges += list(where_merges(gm, example_inputs)) + list(scatter_merges(gm, example_inputs))
    if merges:
        after = analysis_of(gm, example_inputs).reach(merges)
        decoder = any(is_attention(n) or layer_module_path(n) is not None for n in after)
        return GraphKind.PREFILL if decoder else GraphKind.HANDOFF
    if attends_over_past_cache(gm, example_inputs):
        return GraphKind.DECODE
    return GraphKind.TEXT


def is_unfolded_assignment(node: fx.Node) -> bool:
    """``x[mask] = y`` on [B, N, D] float embeddings with a bool mask that ``normalize`` left as it
    was (it writes into a graph input): an image merge this project cannot rewrite, to be named."""
    if not (node.op == "call_function" and node.target is operator.setitem):
        return False
    target, index = tensor_meta(node.args[0]), tensor_meta(node.args[1])
    return (
        target is not None
        and index is not None
        and target.dim() == 3
        and target.is_floating_point()
        and index.dtype == torch.bool
    )


def where_merges(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> dict[fx.Node, bool]:
    """The ``torch.where(is_image, features, embeds)`` calls that merge image features, given at
    full length, into the text's embeddings; each with whether its condition is inverted (True at
    the text: ``where(is_text, embeds, features)``). Of the two [B, N, D] branches one comes from
    the text's embeddings, the other does not but from data (an image, features handed in): a
    ``where`` inside a decoder selects between two values of the text's own stream, and one
    against zeros or a constant row is no merge."""
    analysis = analysis_of(gm, example_inputs)

    def find() -> dict[fx.Node, bool]:
        candidates = [n for n in gm.graph.nodes if _selects_sequence_rows(n)]
        if not candidates:
            return {}
        from_text, from_data = analysis.reach_of_text, analysis.reach_of_float_data
        found: dict[fx.Node, bool] = {}
        for node in candidates:
            _, selected, other = node.args
            for features, embeds, inverted in ((selected, other, False), (other, selected, True)):
                if embeds in from_text and features not in from_text and features in from_data:
                    found[node] = inverted
        return found

    return analysis.memo("where_merges", find)


def scatter_merges(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> dict[fx.Node, tuple]:
    """The ``embeds.scatter(1, index, features)`` calls that write image features [B, T, D] at the
    positions ``index`` [B, T, D] into the text's embeddings [B, N, D]; each with its (embeds, index,
    features). As for ``where``: the written-into tensor comes from the text's embeddings, the
    features do not but from data."""
    analysis = analysis_of(gm, example_inputs)

    def find() -> dict[fx.Node, tuple]:
        candidates = {n: args for n in gm.graph.nodes if (args := scatter_arguments(n)) is not None}
        if not candidates:
            return {}
        from_text, from_data = analysis.reach_of_text, analysis.reach_of_float_data
        return {
            node: (embeds, index, features)
            for node, (embeds, index, features) in candidates.items()
            if embeds in from_text and features not in from_text and features in from_data
        }

    return analysis.memo("scatter_merges", find)


def scatter_arguments(node: fx.Node):
    """(self, index, src) of a ``scatter`` along dim 1 that writes [B, T, D] rows of a float src
    into a float [B, N, D] tensor (method, ``torch.scatter`` or ``aten.scatter.src``; no reduction),
    else None."""
    if not (
        (node.op == "call_method" and node.target == "scatter")
        or (node.op == "call_function" and node.target in (torch.scatter, torch.ops.aten.scatter.src))
    ):
        return None
    names = ("self", "dim", "index", "src")
    # the positional args stop short where the rest are passed by keyword
    bound = dict(zip(names, node.args, strict=False), **node.kwargs)
    if set(bound) != set(names) or not all(isinstance(bound[k], fx.Node) for k in ("self", "index", "src")):
        return None
    embeds, index, src = (tensor_meta(bound[k]) for k in ("self", "index", "src"))
    out = tensor_meta(node)
    if out is None or embeds is None or index is None or src is None or bound["dim"] not in (1, -2):
        return None
    if not (
        out.dim() == embeds.dim() == index.dim() == src.dim() == 3
        and out.is_floating_point()
        and src.is_floating_point()
        and not index.is_floating_point()
        and same_shape(embeds, out.shape)
        and same_shape(index, src.shape)
        and same_size(src.shape[2], out.shape[2])
    ):
        return None
    return bound["self"], bound["index"], bound["src"]


def _selects_sequence_rows(node: fx.Node) -> bool:
    """``torch.where(condition, a, b)`` (as ``normalize`` spells it) over float [B, N, D] branches
    of the result's own shape, the condition a bool [B, N, 1] (or [B, N, D]): rows of a sequence
    taken from one tensor or the other."""
    if not (
        node.op == "call_function"
        and node.target is torch.where
        and len(node.args) == 3
        and all(isinstance(a, fx.Node) for a in node.args)
    ):
        return False
    out = tensor_meta(node)
    condition, a, b = (tensor_meta(x) for x in node.args)
    if out is None or condition is None or out.dim() != 3 or not out.is_floating_point():
        return False
    if not (same_shape(a, out.shape) and same_shape(b, out.shape)):
        return False
    return (
        condition.dtype == torch.bool
        and condition.dim() == 3
        and all(same_size(condition.shape[i], out.shape[i]) for i in (0, 1))
        and (same_size(condition.shape[2], 1) or same_size(condition.shape[2], out.shape[2]))
    )


def attends_over_past_cache(gm: fx.GraphModule, example_inputs=()) -> bool:
    """Some attention's keys are, or are concatenated from, a non-weight 4-D graph input."""
    inputs = analysis_of(gm, example_inputs).placeholders
    # padded to the placeholders: one a pass added has no example
    examples = list(example_inputs) + [None] * (len(inputs) - len(example_inputs))
    cache_inputs = {n for n, x in zip(inputs, examples, strict=False) if _is_cache_like(n) and not is_weight(n, x)}
    for node in gm.graph.nodes:
        if not is_attention(node):
            continue
        source = sequence_source(attention_args(node)["key"])
        parts = call_arguments(source)["tensors"] if isinstance(source, fx.Node) and is_cat(source) else [source]
        if any(sequence_source(p) in cache_inputs for p in parts if isinstance(p, fx.Node)):
            return True
    return False


def _is_cache_like(node: fx.Node) -> bool:
    t = tensor_meta(node)
    return t is not None and t.dim() == 4 and t.is_floating_point()


def image_values(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> list[fx.Node]:
    """Where images enter a graph (``GraphAnalysis.image_values``): empty when it encodes none."""
    return analysis_of(gm, example_inputs).image_values


def image_inputs(gm: fx.GraphModule, images: Sequence[fx.Node], example_inputs: Sequence[Any] = ()) -> list[int]:
    """Positions of the graph inputs that ``images`` come from: what a call receives as its image."""
    analysis = analysis_of(gm, example_inputs)
    sources = (analysis.image_sources if list(images) == analysis.image_values else computed_from(images)) | set(images)
    data = set(analysis.data_inputs)
    return [i for i, n in enumerate(analysis.placeholders) if n in sources and n in data]


def decoder_layers_fed(gm: fx.GraphModule, images: Sequence[fx.Node], example_inputs: Sequence[Any] = ()) -> list[str]:
    """The indexed layers (``...layers.3``) whose attention both ``images`` and the text's
    embeddings reach: a language model's, run on a sequence the image was merged into. A vision
    tower's own layers see no text, so they are not named."""
    analysis = analysis_of(gm, example_inputs)
    text = analysis.text_embeddings
    if not images or not text:
        return []
    both = analysis.reach(images, through_sizes=False) & analysis.reach_of_text
    paths: list[str] = []
    for node in gm.graph.nodes:
        path = layer_module_path(node) if is_attention(node) and node in both else None
        if path is not None and path not in paths:
            paths.append(path)
    return paths


def runs_decoder_layers(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> bool:
    """Whether the text's embeddings reach an indexed layer: a language model runs here (a vision
    tower's layers, split from its patch embedding, run on [P, D] patches, not on text)."""
    analysis = analysis_of(gm, example_inputs)
    return any(layer_module_path(n) is not None for n in analysis.reach(analysis.text_embeddings, through_sizes=False))


def is_layer_forward(gm: fx.GraphModule) -> bool:
    """A decoder layer's own forward: an attention call, and no indexed layer module around any node
    (Dynamo traced the layer as a frame of its own; the loop calling it ran outside any graph)."""
    nodes = gm.graph.nodes
    return any(is_attention(n) for n in nodes) and not any(layer_module_path(n) is not None for n in nodes)


def hidden_inputs_into_layers(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> list[int]:
    """The positions of the float [B, N, ...] inputs (rank 3, or 4: parallel residual streams) that
    reach an attention call or a linear layer: hidden states an earlier graph computed (a decoder
    split between or inside its layers, whose graphs name no layer index). While an image waits
    unpruned, one of the prompt's [B, N] (``token_id_inputs``) is the language model running on
    it: the runtime compares shapes per call, as a graph cannot know which request it serves (a
    vision tower's layers run on patches, of other shapes)."""
    analysis = analysis_of(gm, example_inputs)
    data = set(analysis.data_inputs)
    found = []
    for i, node in enumerate(analysis.placeholders):
        if (
            node in data
            and (is_float(node, rank=3) or is_float(node, rank=4))
            and any(
                is_attention(n) or (n.op == "call_function" and n.target in _LINEAR)
                for n in analysis.reach([node], through_sizes=False)
            )
        ):
            found.append(i)
    return found


def token_id_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> list[int]:
    """The positions of the [B, N] token-id inputs a graph embeds: the prompt's shape, per call."""
    analysis = analysis_of(gm, example_inputs)
    read = {i for _, i in analysis.token_lookups}
    return [k for k, node in enumerate(analysis.placeholders) if node in read]
