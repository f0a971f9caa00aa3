"""Helpers shared by the passes: the pass context and result, node queries, fake propagation."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, statically_known_true, sym_eq
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import era_compile.ops  # noqa: F401  (registers torch.ops.era.*, which the passes insert)
from era_compile.config import ERAConfig


class PassError(RuntimeError):
    """A pass found a structure it cannot rewrite safely; the graph is left for the fallback."""


@dataclass
class PassResult:
    """What one pass did: ``counts`` go to the report (numbers, or a list of layer indices);
    ``skipped`` says why it did nothing."""

    name: str
    changed: bool = False
    counts: Dict[str, Any] = field(default_factory=dict)
    skipped: Optional[str] = None


@dataclass
class VisualSpan:
    """Where the image features enter the sequence (found by ``span``)."""

    merge: fx.Node          # the merged embeddings: the masked_scatter, or the input that carries them
    visual_mask: fx.Node    # bool [B, N], True at visual positions (inserted by ``span``)
    batch: Any              # B (int, or SymInt in a dynamic graph)
    seq_len: Any            # N (int, or SymInt)
    num_visual: int         # T, visual tokens per sample: always static (see ``span``)


@dataclass
class CarriedVisual:
    """Visual positions that reached this graph with its input embeddings: the merge ran in an
    earlier graph, which handed its mask on (see ``handoff`` and ``era_compile.runtime``)."""

    input_index: int        # the placeholder holding the merged embeddings [B, N, D]
    mask: torch.Tensor      # the example's bool [B, N] visual mask (a real tensor)
    num_visual: int         # T per sample, fixed by the graph that merged


@dataclass
class DecoderLayer:
    """One decoder layer of the language model (found by ``layers``)."""

    index: int              # position among the language model's layers, 0-based
    module_path: str        # e.g. "L['self'].language_model.layers.3"
    attention: fx.Node      # its scaled_dot_product_attention call
    nodes: Set[fx.Node]     # every node traced inside the layer's module
    hidden_in: fx.Node      # the residual stream entering the layer, [B, N, D]


@dataclass
class PruneSite:
    """What ``prune`` inserted, for ``attention`` to use."""

    layer: int
    keep_index: fx.Node     # int64 [B, n'] original positions kept, ascending
    log_bias: fx.Node       # float32 [B, n'] LAR bias per kept key (0 off the anchors)
    downstream: Set[fx.Node]
    visual_tokens: int
    kept: int
    seq_len_before: int     # N of the example (a hint when the graph is dynamic)
    seq_len_after: int      # n' of the example
    kept_len: Any           # n' as the graph knows it: an int, or a SymInt in a dynamic graph
    attention_mask: Optional[fx.Node]  # layer K's mask over the original positions, if any


@dataclass
class CachedLayer:
    """A decoder layer's KV-cache write (found by ``kvcache``)."""

    index: int                      # module index: "...layers.3" is layer 3
    attention: fx.Node              # its attention call (SDPA or era::biased_attention)
    keys: fx.Node                   # cat([past, new], -2): the cached keys after this call
    values: fx.Node
    keys_output: int                # position of ``keys`` among the graph outputs
    values_output: int
    past_keys: Optional[fx.Node]    # the graph input holding the past keys (decode), else None


@dataclass
class PassContext:
    """State that flows through the pipeline for one graph."""

    config: ERAConfig
    example_inputs: List[Any]       # grows by one when ``span`` adds the carried visual mask as an input
    graph_index: int = 0
    carried: Optional[CarriedVisual] = None
    span: Optional[VisualSpan] = None
    layers: List[DecoderLayer] = field(default_factory=list)
    prune_site: Optional[PruneSite] = None
    kernel: Optional[str] = None
    cache_layers: List[CachedLayer] = field(default_factory=list)
    extra_outputs: int = 0          # trailing outputs the runtime strips (see ``publish``)
    handoff_output: Optional[int] = None  # output holding the merged embeddings (see ``handoff``)


# --------------------------------------------------------------------------- node queries

_SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA_TARGETS


def is_attention(node: fx.Node) -> bool:
    """SDPA, or the biased attention a pass already put in its place (q, k, v come first in both)."""
    return is_sdpa(node) or (node.op == "call_function"
                             and node.target is torch.ops.era.biased_attention.default)


def is_masked_scatter(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "masked_scatter"
    if node.op == "call_function":
        return node.target in (torch.Tensor.masked_scatter, torch.masked_scatter,
                               torch.ops.aten.masked_scatter.default)
    return False


def fake_value(node: Any) -> Any:
    """The fake (meta) value Dynamo or a propagation recorded for a node."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def tensor_meta(node: Any) -> Optional[torch.Tensor]:
    v = fake_value(node)
    return v if isinstance(v, torch.Tensor) else None


# --------------------------------------------------------------------------- sizes
# A Dynamo graph's sizes may be SymInts. A pass must never compare them with ``==`` (that
# installs a guard in Dynamo's ShapeEnv and specialises the graph): it asks whether a fact
# is statically known, plans on the current values (hints), and writes size *nodes*.

def hint(size: Any) -> int:
    """The current concrete value of a size (the example's, for a SymInt)."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def hints(shape) -> Tuple[int, ...]:
    return tuple(hint(d) for d in shape)


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes are known to be equal, without installing a guard."""
    return statically_known_true(sym_eq(a, b))


def same_shape(value: Optional[torch.Tensor], shape: Sequence[Any]) -> bool:
    """True when ``value`` is a tensor known to have ``shape``, without installing a guard."""
    return (value is not None and value.dim() == len(shape)
            and all(same_size(a, b) for a, b in zip(value.shape, shape)))


def is_static(*sizes: Any) -> bool:
    return all(isinstance(d, int) for d in sizes)


def module_stack_paths(node: fx.Node) -> List[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [entry[0] if isinstance(entry, tuple) else str(entry) for entry in stack.values()]


_INDEXED_MODULE = re.compile(r"\.(\d+)$")


def layer_module_path(node: fx.Node) -> Optional[str]:
    """The deepest enclosing module that is an element of a ModuleList (``...layers.3``)."""
    for path in reversed(module_stack_paths(node)):
        if _INDEXED_MODULE.search(path):
            return path
    return None


def layer_index(node: fx.Node) -> Optional[int]:
    path = layer_module_path(node)
    return int(_INDEXED_MODULE.search(path).group(1)) if path else None


def is_size_query(node: fx.Node) -> bool:
    """``x.size(d)`` / ``sym_size(x, d)``: reads a shape, not values."""
    return ((node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size))
            or (node.op == "call_method" and node.target == "size"))


def reachable_from(roots: Iterable[fx.Node], *, through_sizes: bool = True) -> Set[fx.Node]:
    """Every node that (transitively) uses one of ``roots``, the roots excluded.

    ``through_sizes=False`` does not follow a root's size queries: what is computed from the
    length of a tensor (HF's positions and masks in a dynamic graph) does not depend on its values.
    """
    seen: Set[fx.Node] = set()
    todo = [u for r in roots for u in r.users if through_sizes or not is_size_query(u)]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def ancestors_of(node: fx.Node, within: Set[fx.Node]) -> List[fx.Node]:
    """Nodes of ``within`` that ``node`` depends on (itself included), in graph order."""
    seen: Set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen or n not in within:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def sdpa_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """An argument of a scaled_dot_product_attention call, positional or keyword."""
    order = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    if name in node.kwargs:
        return node.kwargs[name]
    i = order.index(name)
    return node.args[i] if i < len(node.args) else default


# --------------------------------------------------------------------------- graph upkeep

def propagate_fake(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Refresh ``meta['val']`` of every node; raises if the shapes do not check.

    Runs in Dynamo's own fake mode when the placeholders carry its fake values (so its
    ShapeEnv owns any data-dependent scalar, like HF's ``.item()`` checks), else in a new one.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    mode = next((f.fake_mode for f in fakes if isinstance(f, FakeTensor)), None)
    if mode is None or len(fakes) != len(example_inputs):
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        fakes = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
                 for x in example_inputs]
    # Constants read by get_attr are real tensors (Dynamo makes module buffers constants when
    # Inductor freezing is on): the mode must accept them while it propagates.
    allowed, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    finally:
        mode.allow_non_fake_inputs = allowed
    for node in gm.graph.nodes:  # Dynamo's own key, kept consistent for later readers
        if "val" in node.meta and "example_value" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def finish(gm: fx.GraphModule, *, drop_dead: bool = False) -> None:
    """Lint and regenerate code after a pass; at the end of the pipeline also drop dead nodes."""
    if drop_dead:
        gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()


def _is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    return node.is_impure()


def insert_call(graph: fx.Graph, target: Any, args: tuple, kwargs: Optional[dict] = None,
                *, stem: str) -> fx.Node:
    """A call node named ``era_<stem>``: FX makes the name unique, and a name of our own
    cannot shadow the function it calls in the generated code (findings, pitfall 11)."""
    return graph.create_node("call_function", target, args, kwargs or {}, name=f"era_{stem}")


def replace_with_biased_attention(graph: fx.Graph, call: fx.Node, bias: fx.Node, kernel_name: str,
                                  layer: int) -> fx.Node:
    """Swap an SDPA call for ``era::biased_attention`` with the same q, k, v, mask, causality and
    scale plus a per-key ``bias``; returns the new node (which keeps the call's module stack)."""
    if float(sdpa_arg(call, "dropout_p", 0.0) or 0.0) != 0.0:
        raise PassError(f"layer {layer}: attention with dropout (training?) cannot be rectified")
    from era_compile.ops.attention import resolve_kernel

    q, k, mask = sdpa_arg(call, "query"), sdpa_arg(call, "key"), sdpa_arg(call, "attn_mask")
    causal = bool(sdpa_arg(call, "is_causal", False))
    kernel = resolve_kernel(kernel_name, tensor_meta(q), tensor_meta(k), tensor_meta(mask), causal)
    with graph.inserting_before(call):
        biased = insert_call(
            graph, torch.ops.era.biased_attention.default,
            (q, k, sdpa_arg(call, "value"), bias, mask, causal, sdpa_arg(call, "scale"), kernel),
            stem=f"biased_attention_{layer}")
    biased.meta.update({key: call.meta[key] for key in ("nn_module_stack", "stack_trace") if key in call.meta})
    call.replace_all_uses_with(biased)
    graph.erase_node(call)
    return biased


def getitem(graph: fx.Graph, node: fx.Node, i: int, stem: str) -> fx.Node:
    return insert_call(graph, operator.getitem, (node, i), stem=stem)
