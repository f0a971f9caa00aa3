"""analysis: the whole-graph facts that the classifier, the backend and the passes all ask for, once.

Which inputs are data (not weights), where images enter, the text's embeddings, the token lookups,
what a set of nodes reaches: each walks the whole graph, and a 7B model's prefill graph has thousands
of nodes. ``analysis_of(gm, example_inputs)`` gives the graph's one ``GraphAnalysis``, which computes
each fact on first use and keeps it. The pass manager drops it whenever a pass changes the graph
(``forget``): a fact is never read off an older graph. Nothing here rewrites a graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fx_utils import is_weight, placeholders, reachable_from, tensor_meta, tensor_value

_KEY = "era_analysis"
_EMBEDDING_LOOKUPS = {torch.nn.functional.embedding, torch.embedding, torch.ops.aten.embedding.default}
# What a vision tower's patch embedding runs: a 2-D (images) or 3-D (video, Qwen's patches)
# convolution. Not 1-D ones: audio encoders and some language models (short convolutions) run
# those on what is no image.
CONVOLUTIONS = {
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.convolution,
    torch._convolution,
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten._convolution.default,
}


def analysis_of(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> GraphAnalysis:
    """The graph's analysis for these example inputs: kept until a pass changes the graph."""
    kept = gm.meta.get(_KEY)
    if kept is None or not kept.describes(gm, example_inputs):
        kept = gm.meta[_KEY] = GraphAnalysis(gm, example_inputs)
    return kept


def forget(gm: fx.GraphModule) -> None:
    """The graph changed: what was known of it no longer holds."""
    gm.meta.pop(_KEY, None)


class GraphAnalysis:
    """Facts of one graph (as it is now) and its example inputs, each computed on first use."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        self.gm, self.graph = gm, gm.graph
        # what the facts read of the inputs, not the inputs: a kept example would keep a call's
        # tensors (a variant compiled on its first call's arguments) alive with the graph
        self.inputs = _describe(example_inputs)
        self._reach: dict[tuple[frozenset[fx.Node], bool], frozenset[fx.Node]] = {}
        self._memo: dict[str, Any] = {}

    def describes(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
        return gm.graph is self.graph and _describe(example_inputs) == self.inputs

    def memo(self, name: str, compute: Callable[[], Any]) -> Any:
        """A fact another module defines (a pattern of ``kinds``), computed once like the rest."""
        if name not in self._memo:
            self._memo[name] = compute()
        return self._memo[name]

    def reach(self, roots: Iterable[fx.Node], *, through_sizes: bool = True) -> frozenset[fx.Node]:
        """``fx_utils.reachable_from``, remembered per set of roots."""
        key = (frozenset(roots), through_sizes)
        if key not in self._reach:
            self._reach[key] = frozenset(reachable_from(key[0], through_sizes=through_sizes))
        return self._reach[key]

    @functools.cached_property
    def placeholders(self) -> list[fx.Node]:
        return placeholders(self.gm)

    @functools.cached_property
    def data_inputs(self) -> list[fx.Node]:
        """The tensor placeholders bound to data, not to a parameter or buffer (nor a size)."""
        inputs = self.placeholders
        # padded to the placeholders: one past the examples (a pass added it) is no parameter
        parameters = list(self.inputs) + [(0, False)] * (len(inputs) - len(self.inputs))
        return [
            n
            for n, (_, parameter) in zip(inputs, parameters, strict=False)
            if tensor_meta(n) is not None and not parameter and not is_weight(n, None)
        ]

    @functools.cached_property
    def image_values(self) -> list[fx.Node]:
        """Where images enter: inputs named like pixels, and 2-D/3-D convolutions of a graph input (or
        of a value computed from one: a weight's own convolution is no image). Empty: the graph
        encodes no image (a text-only prompt skips the vision tower, so none of this runs)."""
        data = self.data_inputs
        from_data = self.reach(data, through_sizes=False) | set(data)
        pixels = [n for n in data if "pixel" in n.name]
        convolutions = [
            n for n in self.graph.nodes if convolution_weight_rank(n) in (4, 5) and _first_argument(n) in from_data
        ]
        return pixels + convolutions

    @functools.cached_property
    def image_sources(self) -> frozenset[fx.Node]:
        """Every node the image values are computed from."""
        return frozenset(computed_from(self.image_values))

    @functools.cached_property
    def token_lookups(self) -> list[tuple[fx.Node, fx.Node]]:
        """(embedding lookup, the [B, N] token-id data input it reads), for every lookup of token ids."""
        data = set(self.data_inputs)
        found = []
        for node in self.graph.nodes:
            if node.op == "call_function" and node.target in _EMBEDDING_LOOKUPS:
                indices = [_through_one_input_ops(a) for a in node.args[:2] if _is_integer(a)]
                found += [(node, i) for i in indices if i in data and _is_token_sequence(i)]
        return found

    @functools.cached_property
    def text_embeddings(self) -> list[fx.Node]:
        """Token embeddings (a lookup of an integer graph input), and [B, N, D] float inputs (embeddings
        computed before the graph) that an integer input of length N comes with (token ids, a mask,
        positions), none of them where an image comes from: a vision tower's patches split across
        graphs come with no token-length input but the image's own (SigLIP2's ``pixel_attention_mask``)."""
        images = set(self.image_values)
        data = [n for n in self.data_inputs if n not in self.image_sources and n not in images]
        values = [tensor_value(n) for n in data]  # data inputs are tensors
        lengths = [v.shape[-1] for v in values if v.dim() and not v.is_floating_point()]
        embedded = [
            n
            for n in data
            if is_float(n, rank=3)
            and any(statically_known_true(tensor_value(n).shape[1] == length) for length in lengths)
        ]
        kept = set(data)
        return embedded + [lookup for lookup, ids in self.token_lookups if ids in kept]

    @functools.cached_property
    def reach_of_text(self) -> frozenset[fx.Node]:
        """What the text's embeddings reach, them included."""
        text = self.text_embeddings
        return self.reach(text, through_sizes=False) | frozenset(text)

    @functools.cached_property
    def reach_of_float_data(self) -> frozenset[fx.Node]:
        """What the float data inputs that are not the text reach (an image, features handed in)."""
        text = set(self.text_embeddings)
        floats = [n for n in self.data_inputs if tensor_value(n).is_floating_point() and n not in text]
        return self.reach(floats, through_sizes=False) | frozenset(floats)


def _describe(example_inputs: Sequence[Any]) -> tuple[tuple[int, bool], ...]:
    """Per example input its identity and whether it is a parameter (all ``is_weight`` reads of it)."""
    return tuple((id(x), isinstance(x, torch.nn.Parameter)) for x in example_inputs)


def computed_from(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node that ``nodes`` are (transitively) computed from, themselves excluded unless one
    feeds another."""
    seen: set[fx.Node] = set()
    todo = [a for n in nodes for a in n.all_input_nodes]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def convolution_weight_rank(node: fx.Node):
    """The rank of a convolution's weight ([C_out, C_in, k...]), or None for any other node."""
    if not (node.op == "call_function" and node.target in CONVOLUTIONS):
        return None
    weight = tensor_meta(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))  # F.conv1d(x, weight=w)
    return None if weight is None else weight.dim()


def _first_argument(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _through_one_input_ops(node: Any) -> Any:
    """Back through calls with one tensor input (a cast, a clamp): the node that holds the values."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function"):
        inputs = [a for a in node.all_input_nodes if tensor_meta(a) is not None]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return node


def _is_token_sequence(node: fx.Node) -> bool:
    """[B, N] token ids, not a grid descriptor a vision tower embeds positions from (NaFlex's
    ``spatial_shapes`` [B, 2], ``image_grid_thw`` [n, 3])."""
    t = tensor_meta(node)
    return t is not None and t.dim() == 2 and not statically_known_true(t.shape[-1] <= 3)


def _is_integer(node: Any) -> bool:
    t = tensor_meta(node)
    return t is not None and not t.is_floating_point() and t.dtype is not torch.bool


def is_float(node: fx.Node, rank: int) -> bool:
    """A floating-point tensor of this rank."""
    t = tensor_meta(node)
    return t is not None and t.is_floating_point() and t.dim() == rank
