"""normalize: one spelling per op family, so every later pass (and the classifier) matches one form.

Dynamo records a call as the user wrote it (``x.view(1, 4, -1)``, ``torch.reshape(x, s)``,
``torch.Tensor.masked_scatter(x, m, f)``), an aten-level graph as overloads; each torch or
transformers release can add a spelling. This pass folds them:

=================  ====================================================  =====================================
family             folded from                                           into
=================  ====================================================  =====================================
view / reshape /   varargs sizes, ``size=``/``shape=`` keywords,          ``x.view(sizes)``, ``x.reshape(sizes)``,
expand             ``torch.reshape``, ``torch.Tensor.view/reshape/       ``x.expand(sizes)``: call_method, one
                   expand``, ``aten.view/_unsafe_view/reshape/expand``   size tuple (``x.view(dtype)`` untouched)
image merge        ``torch.Tensor.masked_scatter``, ``torch.masked_      ``embeds.masked_scatter(mask, features)``
                   scatter``, ``aten.masked_scatter``; index assignment  (call_method); an assignment becomes a
                   ``embeds[mask] = features`` (``operator.setitem``,    new node and later readers of
                   ``index_put_`` with one bool index)                   ``embeds`` read it
attention          ``torch._C._nn.scaled_dot_product_attention`` (the    ``F.scaled_dot_product_attention(q, k,
                   same builtin as ``F.``), ``aten.scaled_dot_product_   v, attn_mask=, dropout_p=, is_causal=,
                   attention``, any mix of positional and keyword        scale=, enable_gqa=)``
cat                ``torch.concat``/``concatenate``, ``aten.cat``,        ``torch.cat(tensors, dim=d)``, d >= 0
                   negative or positional ``dim``
where              ``x.where(condition, y)``, ``aten.where.self``,        ``torch.where(condition, x, y)``,
                   keyword arguments                                     positional
=================  ====================================================  =====================================

Why each: ``seqshape`` rewrites the size tuples of views; ``span`` and the classifier find the
merge; ``prune`` and ``attention`` read SDPA's arguments by name; ``kvcache`` finds
cache writes as ``cat(dim=2)``; ``kinds`` tells an image merge by ``torch.where`` (features at
full length, ``where(is_image, features[slot], embeds)``) from the other ``where`` calls. An
assignment into a graph *input* is left as it is (folding it would drop a write the caller
sees); ``span`` then names it.

Before::

    view = l_x_.view(1, 43, -1, 16);  cat = torch.cat([a, b], -2)
    embeds[mask] = features;  h = embeds * 2

After::

    view = l_x_.view((1, 43, -1, 16));  cat = torch.cat([a, b], dim=2)
    masked_scatter = embeds.masked_scatter(mask.unsqueeze(-1), features);  h = masked_scatter * 2
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .fx_utils import SDPA, call_arguments, same_size, tensor_meta, tensor_value
from .graph_pass import PassResult, graph_pass
from .rewrite import insert_call, replace_node

_VIEW_FUNCTIONS = {
    torch.reshape: "reshape",
    torch.Tensor.reshape: "reshape",
    torch.Tensor.view: "view",
    torch.Tensor.expand: "expand",
    torch.ops.aten.view.default: "view",
    torch.ops.aten._unsafe_view.default: "view",
    torch.ops.aten.reshape.default: "reshape",
    torch.ops.aten.expand.default: "expand",
}
_MERGE_FUNCTIONS = {torch.Tensor.masked_scatter, torch.masked_scatter, torch.ops.aten.masked_scatter.default}
_SDPA_FUNCTIONS = {SDPA, torch.ops.aten.scaled_dot_product_attention.default}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default}
_WHERE_FUNCTIONS = {torch.where, torch.ops.aten.where.self}
_INDEX_PUT = {torch.ops.aten.index_put_.default, torch.Tensor.index_put_}  # in place: embeds is written
_SDPA_KEYWORDS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@graph_pass("normalize", keeps_meta=True, rewrites=False)
def normalize(gm: fx.GraphModule, ctx) -> PassResult:
    graph = gm.graph
    folded: dict[str, int] = {"views": 0, "merges": 0, "attention": 0, "cat": 0, "where": 0}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        if _fold_view(graph, node):
            folded["views"] += 1
        elif _fold_merge(graph, node):
            folded["merges"] += 1
        elif _fold_sdpa(graph, node):
            folded["attention"] += 1
        elif _fold_cat(graph, node):
            folded["cat"] += 1
        elif _fold_where(graph, node):
            folded["where"] += 1
    return PassResult(changed=any(folded.values()), counts=folded)


# --------------------------------------------------------------------------- views


def _fold_view(graph: fx.Graph, node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        method = node.target
        sizes = _sizes(node.args[1:], node.kwargs)
    elif node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
        method = _VIEW_FUNCTIONS[node.target]
        sizes = _sizes(node.args[1:], {k: v for k, v in node.kwargs.items() if k != "implicit"})
    else:
        return False
    if sizes is None:  # x.view(torch.float16) reinterprets the dtype: not a shape op
        return False
    args = (node.args[0], tuple(sizes))
    if node.op == "call_method" and node.args == args and not node.kwargs:
        return False
    if node.op == "call_method":
        node.args, node.kwargs = args, {}
    else:
        replace_node(graph, node, "call_method", method, args, {})
    return True


def _sizes(rest: tuple, kwargs: dict) -> list | None:
    if "size" in kwargs or "shape" in kwargs:
        rest = (kwargs.get("size", kwargs.get("shape")),)
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if any(isinstance(r, torch.dtype) for r in rest):
        return None
    return list(rest)


# --------------------------------------------------------------------------- image merge


def _fold_merge(graph: fx.Graph, node: fx.Node) -> bool:
    is_method = node.op == "call_method" and node.target == "masked_scatter"
    if is_method or (node.op == "call_function" and node.target in _MERGE_FUNCTIONS):
        args = _positional(node, ("self", "mask", "source"))
        if is_method and (node.args, node.kwargs) == (args, {}):
            return False
        if is_method:
            node.args, node.kwargs = args, {}
        else:
            replace_node(graph, node, "call_method", "masked_scatter", args, {})
        return True
    assignment = _assignment(node)
    if assignment is None:
        return False
    embeds, mask, features = assignment
    with graph.inserting_before(node.next):  # (inserting_after would put the two in reverse order)
        if tensor_value(mask).dim() == 2:
            value = tensor_value(mask).unsqueeze(-1)
            mask = insert_call(graph, torch.unsqueeze, (mask, -1), stem="merge_mask")
            mask.meta["val"] = value
        merged = graph.create_node("call_method", "masked_scatter", (embeds, mask, features), {})
    merged.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "example_value")})
    merged.meta["val"] = tensor_meta(embeds)
    later = _nodes_after(node)
    for user in list(embeds.users):  # whoever read embeds after the write reads the merge
        if user in later and user is not merged:
            user.replace_input_with(embeds, merged)
    for user in list(node.users):  # index_put_ returns its (written) first argument
        user.replace_input_with(node, merged)
    graph.erase_node(node)
    return True


def _positional(node: fx.Node, names: tuple) -> tuple:
    """The arguments of a tensor-method call in ``names`` order, whatever mix of positional and
    keyword arguments (``input=`` for ``self`` in the torch.* spelling) it was given."""
    if isinstance(node.target, torch._ops.OpOverload):
        args = call_arguments(node)
        return tuple(args[n] for n in names)
    kwargs = dict(node.kwargs)
    if "input" in kwargs:
        kwargs["self"] = kwargs.pop("input")
    return tuple(node.args) + tuple(kwargs[n] for n in names[len(node.args) :])


def _assignment(node: fx.Node):
    """``embeds[mask] = features`` in any in-place spelling -> (embeds, mask, features), when it is
    a merge that may be folded: float [B, N, D] embeddings computed in the graph (not an input),
    one bool [B, N] or [B, N, 1] mask, features as rows [T, D]."""
    if node.op == "call_function" and node.target is operator.setitem:
        embeds, index, features = node.args[:3]
    elif (node.op == "call_method" and node.target == "index_put_") or (
        node.op == "call_function" and node.target in _INDEX_PUT
    ):
        embeds, indices, features = _positional(node, ("self", "indices", "values"))
        if node.kwargs.get("accumulate") or not isinstance(indices, (list, tuple)) or len(indices) != 1:
            return None
        index = indices[0]
    else:
        return None
    target, mask, source = tensor_meta(embeds), tensor_meta(index), tensor_meta(features)
    if (
        target is None
        or mask is None
        or source is None
        or not isinstance(embeds, fx.Node)
        or embeds.op == "placeholder"
    ):
        return None
    if target.dim() != 3 or not target.is_floating_point() or mask.dtype != torch.bool:
        return None
    if mask.dim() not in (2, 3) or (mask.dim() == 3 and not same_size(mask.shape[-1], 1)):
        return None
    if source.dim() != 2 or same_size(source.shape[0], 1):
        return None  # one row may be a value to broadcast, which masked_scatter would not repeat
    return embeds, index, features


def _nodes_after(node: fx.Node) -> set:
    later, seen = set(), False
    for n in node.graph.nodes:
        if seen:
            later.add(n)
        seen = seen or n is node
    return later


# --------------------------------------------------------------------------- attention and cat


def _fold_sdpa(graph: fx.Graph, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _SDPA_FUNCTIONS:
        return False
    args = call_arguments(node)
    canonical = ((args["query"], args["key"], args["value"]), {k: args[k] for k in _SDPA_KEYWORDS})
    if node.target is SDPA and (node.args, node.kwargs) == canonical:
        return False
    if node.target is SDPA:
        node.args, node.kwargs = canonical
    else:
        replace_node(graph, node, "call_function", SDPA, *canonical)
    return True


def _fold_cat(graph: fx.Graph, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CAT_FUNCTIONS:
        return False
    args = call_arguments(node)
    out = tensor_meta(node)
    dim = args["dim"]
    if out is not None and dim < 0:
        dim += out.dim()
    canonical = ((list(args["tensors"]),), {"dim": dim})
    if node.target is torch.cat and (node.args, node.kwargs) == canonical:
        return False
    if node.target is torch.cat:
        node.args, node.kwargs = canonical
    else:
        replace_node(graph, node, "call_function", torch.cat, *canonical)
    return True


def _fold_where(graph: fx.Graph, node: fx.Node) -> bool:
    canonical: tuple[Any, ...]  # (condition, self, other)
    if (node.op == "call_method" and node.target == "where") or (
        node.op == "call_function" and node.target is torch.Tensor.where
    ):
        args = _positional(node, ("self", "condition", "other"))
        canonical = (args[1], args[0], args[2])
    elif node.op == "call_function" and node.target in _WHERE_FUNCTIONS:
        names = ("condition", "self", "other")
        kwargs = {("self" if k == "input" else k): v for k, v in node.kwargs.items()}
        if len(node.args) + len(kwargs) != 3:
            return False  # torch.where(condition) is nonzero's tuple of indices: no select
        canonical = tuple(node.args) + tuple(kwargs[n] for n in names[len(node.args) :])
    else:
        return False
    if node.op == "call_function" and node.target is torch.where and (node.args, node.kwargs) == (canonical, {}):
        return False
    replace_node(graph, node, "call_function", torch.where, canonical, {})
    return True
