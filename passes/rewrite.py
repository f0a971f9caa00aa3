"""Rewrite helpers shared by the passes: insert a call, append an input, swap an attention call."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from era_compile.ops.attention import resolve_kernel

from .fx_utils import BIASED_ATTENTION, attention_args, known_scalar, placeholders, tensor_meta
from .graph_pass import PassError
from .records import WalkInput

_KEPT_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def insert_call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None, *, stem: str) -> fx.Node:
    """A call node named ``era_<stem>``: FX makes the name unique, and a name of our own
    cannot shadow the function it calls in the generated code (findings, pitfall 11)."""
    return graph.create_node("call_function", target, args, kwargs or {}, name=f"era_{stem}")


def getitem(graph: fx.Graph, node: fx.Node, i: int, stem: str) -> fx.Node:
    return insert_call(graph, operator.getitem, (node, i), stem=stem)


def append_input(
    gm: fx.GraphModule,
    name: str,
    like: torch.Tensor,
    shape: Sequence[Any],
    dtype: torch.dtype,
    device: str | None = None,
) -> fx.Node:
    """A new last placeholder whose fake value has ``shape`` (sizes of ``like``'s fake mode, so a
    symbolic batch or length stays symbolic), ``dtype`` and ``device`` (``like``'s by default)."""
    last = placeholders(gm)[-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    with like.fake_mode if hasattr(like, "fake_mode") else contextlib.nullcontext():
        node.meta["example_value"] = like.new_empty(tuple(shape), dtype=dtype, device=device or like.device)
    node.meta["val"] = node.meta["example_value"]
    return node


def append_walk_input(
    gm: fx.GraphModule, hidden: fx.Node, example: torch.Tensor, field: str, seq_dim: int
) -> tuple[fx.Node, WalkInput]:
    """A placeholder for what the runtime's walk through a split decoder holds (``field``), shaped
    as ``example`` with the hidden states' batch and length (symbolic in a dynamic graph) at dims 0
    and ``seq_dim``."""
    value = tensor_meta(hidden)
    assert value is not None  # a layer's hidden-state input, which carries its fake value
    shape = list(example.shape)
    shape[0], shape[seq_dim] = value.shape[0], value.shape[1]
    node = append_input(gm, f"era_{field}", value, shape, example.dtype)
    return node, WalkInput(node.name, node.meta["val"], field=field)


def replace_node(
    graph: fx.Graph, old: fx.Node, op: str, target: Any, args: tuple, kwargs: dict, *, name: str | None = None
) -> fx.Node:
    """Put a new call in place of ``old`` (same fake value and module stack), erase ``old``."""
    with graph.inserting_before(old):
        new = graph.create_node(op, target, args, kwargs, name=name)
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def replace_with_biased_attention(
    graph: fx.Graph, call: fx.Node, bias: fx.Node, kernel_name: str, layer: int
) -> fx.Node:
    """Swap an SDPA call for ``era::biased_attention`` with the same q, k, v, mask, causality and
    scale plus a per-key ``bias``; returns the new node (which keeps the call's module stack)."""
    args = attention_args(call)
    dropout = known_scalar(args.get("dropout_p"))
    if isinstance(dropout, fx.Node):
        raise PassError(
            f"layer {layer}: the attention's dropout is a value of the graph, perhaps not 0 (training?): "
            "it cannot be rectified"
        )
    if float(dropout or 0.0) != 0.0:
        raise PassError(f"layer {layer}: attention with dropout (training?) cannot be rectified")
    q, k, mask, causal = args["query"], args["key"], args["attn_mask"], known_scalar(args["is_causal"])
    if isinstance(causal, fx.Node):  # decided per call: a kernel that runs either way
        kernel = _kernel_for_both(kernel_name, tensor_meta(q), tensor_meta(k), tensor_meta(mask))
    else:
        causal = bool(causal)
        kernel = resolve_kernel(kernel_name, tensor_meta(q), tensor_meta(k), tensor_meta(mask), causal)
    with graph.inserting_before(call):
        biased = insert_call(
            graph,
            BIASED_ATTENTION,
            (),
            dict(
                q=q, k=k, v=args["value"], bias=bias, attn_mask=mask, causal=causal, scale=args["scale"], kernel=kernel
            ),
            stem=f"biased_attention_{layer}",
        )
    biased.meta.update({key: call.meta[key] for key in _KEPT_META if key in call.meta})
    call.replace_all_uses_with(biased)
    graph.erase_node(call)
    return biased


def _kernel_for_both(kernel_name: str, q, k, mask) -> str:
    """The kernel for a call whose causality is a graph value: the one ``kernel_name`` resolves to
    when it runs both causal and not (an explicit kernel that cannot is refused by the op itself)."""
    either = {resolve_kernel(kernel_name, q, k, mask, causal) for causal in (False, True)}
    return either.pop() if len(either) == 1 else "sdpa"
