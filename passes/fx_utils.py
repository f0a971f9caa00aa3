"""Questions about a graph: node tests, arguments by name, shapes and SymInts, module paths,
reachability. Nothing here rewrites a graph or holds a record.

Node tests match the one spelling ``normalize`` leaves (``call_method masked_scatter``,
``F.scaled_dot_product_attention`` with keyword arguments, ``torch.cat(tensors, dim=d)``,
``call_method view/reshape/expand`` with one size tuple).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import has_free_unbacked_symbols, statically_known_true, sym_eq
from torch.fx.operator_schemas import normalize_function

import era_compile.ops  # noqa: F401  (registers torch.ops.era.*, which the passes insert)

SDPA = F.scaled_dot_product_attention  # the same builtin as torch._C._nn.scaled_dot_product_attention
BIASED_ATTENTION = torch.ops.era.biased_attention.default
SHAPE_METHODS = ("view", "reshape", "expand")


# --------------------------------------------------------------------------- node tests


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is SDPA


def is_biased_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is BIASED_ATTENTION


def is_attention(node: fx.Node) -> bool:
    """SDPA, or the biased attention a pass already put in its place."""
    return is_sdpa(node) or is_biased_attention(node)


def is_masked_scatter(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "masked_scatter"


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.cat


def is_shape_op(node: fx.Node) -> bool:
    """view / reshape / expand, which carry sizes as literals."""
    return node.op == "call_method" and node.target in SHAPE_METHODS


def is_size_query(node: fx.Node) -> bool:
    """``x.size(d)`` / ``sym_size(x, d)``: reads a shape, not values."""
    return (node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size)) or (
        node.op == "call_method" and node.target == "size"
    )


def is_in_place(node: fx.Node) -> bool:
    """A call that writes into its first argument (``x.index_copy_(...)``, ``x.copy_(y)``)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return (
        node.op in ("call_method", "call_function")
        and isinstance(name, str)
        and name.endswith("_")
        and not name.startswith("_")
    )


# --------------------------------------------------------------------------- arguments by name


def call_arguments(node: fx.Node) -> dict[str, Any]:
    """Every argument of a call, by its schema name (defaults filled in). For torch functions and
    ``torch.ops`` overloads alike; the one way passes read the arguments of what they match."""
    if isinstance(node.target, str):  # a method or attribute: no schema to read
        raise TypeError(f"cannot read the arguments of {node.format_node()} by name")
    normalized = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise TypeError(f"cannot read the arguments of {node.format_node()} by name")
    return dict(normalized.kwargs)


def attention_args(node: fx.Node) -> dict[str, Any]:
    """query/key/value/attn_mask/is_causal/scale (and dropout_p for SDPA, bias/kernel for ours)."""
    args = call_arguments(node)
    if is_biased_attention(node):  # our schema's names, in SDPA's words
        args = dict(args, query=args.pop("q"), key=args.pop("k"), value=args.pop("v"), is_causal=args.pop("causal"))
    return args


def known_scalar(arg: Any) -> Any:
    """An attention argument (scale, causality, dropout) as a Python value where the graph fixes it:
    a literal, or a node whose fake value is a symbolic bool the shape environment decides without a
    guard. Otherwise the node itself: a value of the graph (``dynamic=True`` makes the scale a
    ``.item()`` of an input, and ``q_len > 1`` a SymBool), to be passed on as one."""
    if not isinstance(arg, fx.Node):
        return arg
    value = fake_value(arg)
    if isinstance(value, torch.SymBool):
        if statically_known_true(value):
            return True
        if statically_known_true(torch.sym_not(value)):
            return False
    elif isinstance(value, (bool, int, float)):
        return value
    return arg


# --------------------------------------------------------------------------- fake values


def fake_value(node: Any) -> Any:
    """The fake (meta) value Dynamo or a propagation recorded for a node."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def tensor_meta(node: Any) -> torch.Tensor | None:
    v = fake_value(node)
    return v if isinstance(v, torch.Tensor) else None


def tensor_value(node: Any) -> torch.Tensor:
    """``tensor_meta`` of a node known to hold a tensor (a node that does not is a bug of ours)."""
    v = tensor_meta(node)
    if v is None:
        raise TypeError(f"{node} has no tensor value")
    return v


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def graph_outputs(gm: fx.GraphModule) -> list[Any]:
    return list(cast(Sequence[Any], gm.graph.output_node().args[0]))  # Dynamo's output node holds a tuple


def data_dependent_dims(gm: fx.GraphModule) -> dict[int, tuple[int, ...]]:
    """Per graph output, the dimensions whose size is data (an unbacked symbol, like the pruned
    length era::recycle gives), from the outputs' fake values."""
    dims = {}
    for i, node in enumerate(graph_outputs(gm)):
        value = tensor_meta(node) if isinstance(node, fx.Node) else None
        if value is not None:
            found = tuple(
                d
                for d, size in enumerate(value.shape)
                if isinstance(size, torch.SymInt) and has_free_unbacked_symbols(size)
            )
            if found:
                dims[i] = found
    return dims


# --------------------------------------------------------------------------- sizes
# A Dynamo graph's sizes may be SymInts. A pass must never compare them with ``==`` (that
# installs a guard in Dynamo's ShapeEnv and specialises the graph): it asks whether a fact
# is statically known, plans on the current values (hints), and writes size *nodes*.


def hint(size: Any) -> int:
    """The current concrete value of a size (the example's, for a SymInt)."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def example_int(value: Any) -> Any:
    """An integer argument as a plan reads it: a literal as it is; a node whose value is an int (under
    ``dynamic=True`` the prompt's length read off a tensor, a layer's ``sliding_window``) at its
    example; anything else as it is."""
    if isinstance(value, fx.Node):
        example = fake_value(value)
        return hint(example) if isinstance(example, (int, torch.SymInt)) else value
    return value


def hints(shape) -> tuple[int, ...]:
    return tuple(hint(d) for d in shape)


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes are known to be equal, without installing a guard."""
    return statically_known_true(sym_eq(a, b))


def same_shape(value: torch.Tensor | None, shape: Sequence[Any]) -> bool:
    """True when ``value`` is a tensor known to have ``shape``, without installing a guard."""
    return (
        value is not None
        and value.dim() == len(shape)
        and all(same_size(a, b) for a, b in zip(value.shape, shape, strict=True))
    )


def is_static(*sizes: Any) -> bool:
    return all(isinstance(d, int) for d in sizes)


# --------------------------------------------------------------------------- modules

_INDEXED_MODULE = re.compile(r"\.(\d+)$")


def module_stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [entry[0] if isinstance(entry, tuple) else str(entry) for entry in stack.values()]


def layer_module_path(node: fx.Node) -> str | None:
    """The deepest enclosing module that is an element of a ModuleList (``...layers.3``)."""
    for path in reversed(module_stack_paths(node)):
        if _INDEXED_MODULE.search(path):
            return path
    return None


def layer_index(node: fx.Node) -> int | None:
    path = layer_module_path(node)
    match = _INDEXED_MODULE.search(path) if path else None  # a layer's path always matches
    return int(match.group(1)) if match else None


def is_weight(node: fx.Node, example: Any) -> bool:
    """A placeholder bound to a parameter or buffer (weights never carry a sequence dimension)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", None)
    source = source() if callable(source) else (source or "")
    return isinstance(example, torch.nn.Parameter) or "_parameters" in source or "_buffers" in source


# --------------------------------------------------------------------------- reachability


def reachable_from(roots: Iterable[fx.Node], *, through_sizes: bool = True) -> set[fx.Node]:
    """Every node that (transitively) uses one of ``roots``, the roots excluded.

    ``through_sizes=False`` does not follow a root's size queries: what is computed from the
    length of a tensor (HF's positions and masks in a dynamic graph) does not depend on its values.
    """
    seen: set[fx.Node] = set()
    todo = [u for r in roots for u in r.users if through_sizes or not is_size_query(u)]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def ancestors_of(node: fx.Node, within: set[fx.Node]) -> list[fx.Node]:
    """Nodes of ``within`` that ``node`` depends on (itself included), in graph order."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen or n not in within:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def sequence_source(node: Any, seq_dim: int = -2) -> Any:
    """Follow ``node`` back through calls that keep its sequence dimension and have one tensor
    input (views, expands, dtype casts, repeat_kv's reshape): the first node that does not.

    No list of op names and no hop limit: a node is passed through when it has exactly one
    tensor input and both have the same (known) size at ``seq_dim``."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function"):
        inputs = [a for a in node.all_input_nodes if tensor_meta(a) is not None]
        out = tensor_meta(node)
        if len(inputs) != 1 or out is None or out.dim() < 2:
            return node
        src = tensor_value(inputs[0])
        if src.dim() < 2 or not same_size(out.shape[seq_dim], src.shape[seq_dim]):
            return node
        node = inputs[0]
    return node
