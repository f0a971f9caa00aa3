"""prune: cut the residual stream at the input of layer K and continue on the kept tokens.

Before (K = 2)::

    h2 = h1_mid + mlp_1                      # residual stream entering layer 2, [B, N, D]
    x = rms_norm_2(h2) ... view(x, (1, N, -1, 16)) ... sdpa(q, k, v, mask[B,1,N,N])
    cos_2 ... used by every layer

After::

    anchors, conf = era::select(h2, visual_mask, q_1, k_1, mask_1, era_budget, ...)  # layer 1's attention
    keep, h2_kept, log_bias, samples = era::recycle(h2, visual_mask, anchors, conf, mask, ...)  # n': the data's
    cos_kept = gather(cos_unsq, 2, keep[:, None, :, None].expand(B, 1, -1, d))   # every crossing tensor
    mask_kept = gather(gather(mask, 2, keep...), 3, keep...)
    x = rms_norm_2(h2_kept) ... view(x, (1, n', -1, 16)) ... sdpa(q, k, v, mask_kept)

Every node that depends on the cut is "downstream". Upstream nodes are scheduled first,
then the inserted ops, then the downstream nodes, so the inserted ops can read anything
upstream (for K = 0: the cos/sin that layer 0's queries use). Which dimensions to gather
and which shape literals to rewrite is decided by ``seqshape`` (shapes re-run with a sentinel length),
never by matching the value N.

Saliency (ALGORITHMS.md 1.3): the queries, keys and mask of layer K-1's attention call; for
K = 0, a copy of layer 0's query/key computation that reads the unpruned input, and the same of
layer K's where layer K - 1 has no softmax attention (a hybrid decoder's linear or recurrent layer).

In a decoder that Dynamo split into per-layer graphs, layer K's own graph is cut the same way (the
cut is its hidden-state input; its cos/sin and mask inputs are gathered like any crossing tensor),
with layer K - 1's queries and keys as inputs the runtime supplies (``saliency``); ``restore`` then
writes its kept states back at its exit.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.fx as fx

from era_compile.ops.attention import default_scale

from .fx_utils import (
    ancestors_of,
    attention_args,
    hint,
    hints,
    is_weight,
    known_scalar,
    placeholders,
    reachable_from,
    same_size,
    tensor_value,
)
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .records import BudgetInput, DecoderLayers, PruneSite, VisualSpan, WalkInput
from .rewrite import append_input, append_walk_input, getitem, insert_call
from .seqshape import PADS, PaddedTo, SeqLen, plan_sequence_rewrite


@graph_pass("prune", requires=(VisualSpan, DecoderLayers), provides=PruneSite)
def prune_visual_tokens(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    span, layers = ctx.get(VisualSpan), ctx.get(DecoderLayers)
    K = ctx.config.resolved_layer
    layer = layers.by_index(K)
    if layer is None:
        raise PassError(f"layer {K} (ERAConfig.layer) is not in this graph")
    cut = layer.hidden_in
    graph = gm.graph
    original_mask = attention_args(layer.attention)["attn_mask"]  # over the N positions: read before the gathers

    # size queries of the cut stay upstream: in a dynamic graph HF builds positions and masks
    # from the original length, and those are gathered, not recomputed at the pruned length
    downstream = reachable_from([cut], through_sizes=False)
    downstream.discard(graph.output_node())
    first = schedule_upstream_first(graph, downstream)
    budget, budget_input = append_budget(gm, cut)
    queries, keys, source, walked = _saliency_source(gm, ctx, layers, cut, downstream, first)
    with graph.inserting_before(first):
        keep_index, hidden_kept, log_bias, samples = insert_selection(
            graph, ctx, span, cut, queries, keys, source, budget, original_mask
        )
    counts = continue_on_kept(gm, ctx, cut, downstream, first, keep_index, hidden_kept)
    site = PruneSite(K, keep_index, hidden_kept, log_bias, samples, frozenset(downstream), original_mask)
    return PassResult(record=site, changed=True, counts=counts, added_inputs=(budget_input, *walked))


def _saliency_source(
    gm: fx.GraphModule,
    ctx: PassContext,
    layers: DecoderLayers,
    cut: fx.Node,
    downstream: set[fx.Node],
    first: fx.Node,
) -> tuple[fx.Node, fx.Node, dict[str, Any], tuple[WalkInput, ...]]:
    """The queries and keys ``era::select`` scores with, the arguments of the attention call whose
    mask, causality and scale go with them, and the inputs added for them: layer K - 1's; at K = 0 a
    copy of layer 0's computation on the unpruned input; in a split decoder's layer K (layer K - 1 ran
    in a graph of its own) K - 1's as the runtime's walk hands them on, beside layer K's own call,
    since the loop hands every layer the same mask."""
    K = ctx.config.resolved_layer
    previous = layers.by_index(K - 1) if K > 0 else None
    if previous is not None:
        source = attention_args(previous.attention)
        return source["query"], source["key"], source, ()
    own = layers.by_index(K)
    assert own is not None  # the caller found layer K
    source = attention_args(own.attention)
    if K == 0 or K - 1 in layers.without_attention:  # no queries before the cut: layer K's own, unpruned
        with gm.graph.inserting_before(first):
            queries, keys = copy_unpruned(gm.graph, [source["query"], source["key"]], downstream)
        return queries, keys, source, ()
    step = ctx.step
    if step is None or step.queries is None or step.keys is None:
        raise PassError(f"layer {K}: layer {K - 1}'s queries and keys did not reach it (its graph handed none on)")
    queries, added_queries = append_walk_input(gm, cut, step.queries, "queries", seq_dim=2)
    keys, added_keys = append_walk_input(gm, cut, step.keys, "keys", seq_dim=2)
    return queries, keys, source, (added_queries, added_keys)


def continue_on_kept(
    gm: fx.GraphModule,
    ctx: PassContext,
    cut: fx.Node,
    downstream: set[fx.Node],
    first: fx.Node,
    keep_index: fx.Node,
    hidden_kept: fx.Node,
) -> dict[str, int]:
    """Make every node ``downstream`` of ``cut`` [B, N, D] run on ``hidden_kept`` [B, n', D]: the
    tensors made upstream and read downstream gathered at ``keep_index``, the length literals
    following n' (which ones: ``seqshape``). ``first``: the first downstream node, before which the
    gathers go. Returns the counts for the report."""
    graph = gm.graph
    shape = tensor_value(cut).shape
    order = [n for n in graph.nodes if n in downstream]
    # inputs appended by the passes have no example yet (and are no weights): the zip stops before them
    frozen = {n for n, x in zip(placeholders(gm), ctx.example_inputs, strict=False) if is_weight(n, x)}
    # the pruned length is the data's (era::recycle's output size): planned with a sentinel
    plan = plan_sequence_rewrite(order, cut, hints(shape), seq_dim=1, seq_len=hint(shape[1]), frozen=frozen)

    cut.replace_all_uses_with(hidden_kept, delete_user_cb=lambda user: user in downstream)
    with graph.inserting_before(first):
        gathered = _gather_crossing_tensors(graph, plan, keep_index, shape[0])
        literals = _rewrite_lengths(graph, plan, hidden_kept)
    return {"gathered_tensors": gathered, "rewritten_shapes": literals, "downstream_nodes": len(order)}


def append_budget(gm: fx.GraphModule, like: fx.Node) -> tuple[fx.Node, BudgetInput]:
    """The keep budget: an input the runtime supplies on every call, so a new budget compiles nothing."""
    budget = append_input(gm, "era_budget", tensor_value(like), (2,), torch.float64, device="cpu")
    return budget, BudgetInput(budget.name, budget.meta["val"])


def insert_selection(
    graph: fx.Graph,
    ctx: PassContext,
    span: VisualSpan,
    cut: fx.Node,
    queries: fx.Node,
    keys: fx.Node,
    source: dict[str, object],
    budget: fx.Node,
    cut_mask: object,
) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    """era::select on the saliency source (``queries`` and ``keys`` of layer K - 1's attention, or
    of layer 0's on the unpruned input; the mask, causality and scale of ``source``, that call's
    arguments), then era::recycle of ``cut``, dropping the padding that layer K's mask ``cut_mask``
    shows (None: no mask, no padding): keep_index, hidden_kept, log_bias, samples."""
    cfg = ctx.config
    # a graph value (dynamic=True) goes in as one; a literal as the op's Python scalar
    scale, causal = known_scalar(source["scale"]), known_scalar(source["is_causal"])
    scale = default_scale(tensor_value(queries).shape[-1]) if scale is None else scale
    sel = insert_call(
        graph,
        torch.ops.era.select.default,
        (),
        dict(
            hidden=cut,
            visual_mask=span.visual_mask,
            queries=queries,
            keys=keys,
            attn_mask=source["attn_mask"],
            is_causal=causal if isinstance(causal, fx.Node) else bool(causal),
            scale=scale if isinstance(scale, fx.Node) else float(scale),
            budget=budget,
            strategy=cfg.strategy,
            options=json.dumps(cfg.strategy_options(), sort_keys=True),
        ),
        stem="select",
    )
    anchors, confidence = getitem(graph, sel, 0, "anchor_mask"), getitem(graph, sel, 1, "confidence")
    rec = insert_call(
        graph,
        torch.ops.era.recycle.default,
        (),
        dict(
            hidden=cut,
            visual_mask=span.visual_mask,
            anchor_mask=anchors,
            confidence=confidence,
            merge=cfg.recycle,
            weight_norm=cfg.weight_norm,
            attn_mask=cut_mask if isinstance(cut_mask, fx.Node) else None,
        ),
        stem="recycle",
    )
    return (
        getitem(graph, rec, 0, "keep_index"),
        getitem(graph, rec, 1, "hidden_kept"),
        getitem(graph, rec, 2, "log_bias"),
        getitem(graph, rec, 3, "samples"),
    )


def _gather_crossing_tensors(graph: fx.Graph, plan, keep_index: fx.Node, batch) -> int:
    """Each tensor made before the cut and read after it, at the kept positions (once per dims)."""
    gathered: dict[tuple[fx.Node, tuple[int, ...]], fx.Node] = {}
    for (consumer, source_node), dims in plan.gathers.items():
        key = (source_node, dims)
        if key not in gathered:
            gathered[key] = gather_kept(graph, source_node, dims, keep_index, batch)
        consumer.replace_input_with(source_node, gathered[key])
    return len(gathered)


def _rewrite_lengths(graph: fx.Graph, plan, hidden_kept: fx.Node) -> int:
    """The pruned length in shape arguments: a size node read off the pruned stream (its length
    is the data's, so a symbol even in a graph static in N); a planned pad becomes T - n' (a pad to
    the original padded length T), spelled as an appended fill."""
    kept_len = insert_call(graph, torch.ops.aten.sym_size.int, (hidden_kept, 1), stem="kept_len")
    scaled: dict[int, object] = {1: kept_len}
    padded: dict[int, object] = {}  # T -> T - n'

    def resolve(a):
        if isinstance(a, PaddedTo):
            if a.total not in padded:
                padded[a.total] = insert_call(graph, operator.sub, (a.total, kept_len), stem="pad_to_total")
            return padded[a.total]
        if not isinstance(a, SeqLen):
            return a
        if a.factor not in scaled:
            scaled[a.factor] = insert_call(graph, operator.mul, (kept_len, a.factor), stem="kept_len_scaled")
        return scaled[a.factor]

    literals = 0
    for node, (args, kwargs) in plan.shape_args.items():
        new_args, new_kwargs = fx.node.map_aggregate(args, resolve), fx.node.map_aggregate(kwargs, resolve)
        literals += new_args != node.args or new_kwargs != node.kwargs
        node.args, node.kwargs = new_args, new_kwargs
        if node.target in PADS:  # a pad seqshape planned: to the original padded length, a symbol now
            _as_appended_fill(graph, node)
    for (consumer, factory), (args, kwargs) in plan.remade.items():  # its upstream users keep the original
        remade = graph.call_function(
            factory.target, fx.node.map_aggregate(args, resolve), fx.node.map_aggregate(kwargs, resolve)
        )
        consumer.replace_input_with(factory, remade)
        literals += 1
    return literals


def _as_appended_fill(graph: fx.Graph, node: fx.Node) -> None:
    """``F.pad(x, (0, 0, .., 0, t - n'), "constant", value)`` as ``cat([x, full(.., t - n', .., value)])``:
    the pad's operators want literals (a symbolic pad fails their checks), a fill's sizes may be symbols."""
    constant = node.target is torch.ops.aten.constant_pad_nd.default  # (input, pad, value): no mode
    names = ("input", "pad", "value") if constant else ("input", "pad", "mode", "value")
    bound = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    x, value = bound["input"], bound.get("value")
    pad: list[Any] = list(cast(Sequence[Any], bound["pad"]))
    padded = [j for j, p in enumerate(pad) if not (isinstance(p, int) and p == 0)]
    if bound.get("mode", "constant") != "constant" or len(padded) != 1 or padded[0] % 2 == 0:
        raise PassError(f"{node.name}: a pad of the sequence besides other pads cannot follow the pruned length")
    ndim = tensor_value(x).dim()
    dim = ndim - 1 - padded[0] // 2
    with graph.inserting_before(node):
        sizes = [
            pad[padded[0]] if d == dim else insert_call(graph, torch.ops.aten.sym_size.int, (x, d), stem="size")
            for d in range(ndim)
        ]
        fill = insert_call(
            graph, torch.ops.aten.new_full.default, (x, sizes, 0.0 if value is None else value), stem="pad_fill"
        )
    node.target = torch.ops.aten.cat.default
    node.args, node.kwargs = ([x, fill], dim), {}


def schedule_upstream_first(graph: fx.Graph, downstream: set[fx.Node]) -> fx.Node:
    """Move every node that does not depend on the cut before the first one that does.

    Valid because an upstream node never reads a downstream one. Returns the first
    downstream node, the insertion point for the pruning ops.
    """
    nodes = [n for n in graph.nodes if n.op != "output"]
    first = next(n for n in nodes if n in downstream)
    seen_first = False
    for n in nodes:
        if n is first:
            seen_first = True
        elif seen_first and n not in downstream:
            first.prepend(n)
    return first


def copy_unpruned(graph: fx.Graph, values: list[fx.Node], downstream: set[fx.Node]) -> list[fx.Node]:
    """Copies of the computation of ``values`` that read the unpruned cut, not the pruned one."""
    copies: dict[fx.Node, fx.Node] = {}
    for v in values:
        for n in ancestors_of(v, downstream):
            if n not in copies:
                copies[n] = graph.node_copy(n, lambda a: copies.get(a, a))
    return [copies.get(v, v) for v in values]


def gather_kept(graph: fx.Graph, source: fx.Node, dims: tuple[int, ...], keep_index: fx.Node, batch) -> fx.Node:
    """``source`` at the kept positions along ``dims`` (dim 0 is the batch, or 1 to broadcast)."""
    shape = tensor_value(source).shape
    if not (same_size(shape[0], 1) or same_size(shape[0], batch)):
        raise PassError(f"cannot gather {source.name} {list(hints(shape))}: its first dimension is not the batch")
    if 0 in dims:
        raise PassError(f"{source.name}: the sequence cannot be its first (batch) dimension")
    # a source shared by the batch (first dimension 1) is expanded to it; its sizes stay as they are
    # (aten.expand, not Tensor.expand: AOT autograd's cache cannot key a graph that calls a method descriptor)
    batch_size = insert_call(graph, torch.ops.aten.sym_size.int, (keep_index, 0), stem="batch")
    out = insert_call(
        graph,
        torch.ops.aten.expand.default,
        (source, [batch_size] + [-1] * (len(shape) - 1)),
        stem=f"{source.name}_batch",
    )
    for d in dims:
        # keep_index [B, n'] -> [B, 1, .., n', .., 1] with n' at dim d, by unsqueezing, then expanded
        # to the source's sizes read from the graph: take_along_dim would broadcast with static
        # sizes, and so specialise a dynamic graph to the length it was compiled for
        index = keep_index
        for i in range(1, len(shape)):
            if i != d:
                index = insert_call(graph, torch.unsqueeze, (index, i), stem="index")
        sizes = [
            -1 if i == d else insert_call(graph, torch.ops.aten.sym_size.int, (out, i), stem="size")
            for i in range(len(shape))
        ]
        index = insert_call(graph, torch.ops.aten.expand.default, (index, sizes), stem="index")
        out = insert_call(graph, torch.gather, (out, d, index), stem=f"{source.name}_kept")
    return out
