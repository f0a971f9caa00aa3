"""masked: prune an image prompt in a decoder that Dynamo split into per-layer graphs.

A data-dependent op in the layer loop (DeepStack's ``h[visual_mask] + features`` after the first
layers) makes Dynamo trace each decoder layer as a frame of its own; the loop runs eagerly and
hands every layer the position tables (cos/sin) and masks of the full prompt. A sequence cut in
layer K's graph would meet them in layer K + 1's frame, and Dynamo would fail tracing it before
any backend runs. So here the sequence keeps its length and the pruned tokens are masked out as
keys instead: every kept token sees what it sees in a cut prefill (the independent oracle's
argument), the anchors carry what they recycled and their LAR bias, and the runtime caches only
the kept tokens (``CompactKV``), so decode runs on the pruned cache as after any prefill. What a
later layer computes at a pruned position is never read. The saving is the decode's; the prefill's
layers >= K run at full length.

The runtime numbers the layers by call order (``runtime.LayerWalk``) and compiles one variant per
part (``records.LayerStep``); the layers before K - 1 run as Dynamo gave them:

* ``saliency`` (layer K - 1): its attention's queries and keys leave as trailing outputs
  (``SaliencyOutputs``) for layer K's selection::

      return (hidden, ..., era_queries, era_keys)

* ``prune`` (layer K): ``era::select`` (on layer K - 1's queries and keys, supplied as inputs; at
  K = 0 on a copy of the layer's own, of its unpruned input) with this layer's mask, causality and
  scale, ``era::recycle``, then ``era::unprune`` writes the kept states back over the N positions
  and gives the key bias [B, N]: LAR's ``log b`` at the anchors, 0 at text, ``BLOCKED`` at the
  pruned tokens. ``publish`` then returns what the runtime needs for the caches::

      anchors, conf = era::select(h, era_visual_mask, era_queries, era_keys, mask, era_budget, ...)
      keep, h_kept, log_bias, samples = era::recycle(h, era_visual_mask, anchors, conf, ...)
      h_full, key_bias = era::unprune(h, keep, h_kept, log_bias, rectify)
      ... era::biased_attention(q, k, v, bias=key_bias, attn_mask=mask, ...)   # q, k, v of h_full

* ``masked`` (after K): the key bias is an input; the attention call adds it::

      def forward(self, l_hidden_states_, ..., era_key_bias):       # float32 [B, N]
          ... era::biased_attention(q, k, v, bias=era_key_bias, ...)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import attention_args, call_arguments, graph_outputs, reachable_from, same_size, tensor_value
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .prune import append_budget, copy_unpruned, insert_selection, schedule_upstream_first
from .records import AddedInput, DecoderLayers, PruneSite, RectifiedAttention, SaliencyOutputs, VisualSpan, WalkInput
from .rewrite import append_input, getitem, insert_call, replace_with_biased_attention


@graph_pass("saliency", requires=(DecoderLayers,), provides=SaliencyOutputs)
def hand_on_saliency(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Layer K - 1: its attention's queries and keys leave as trailing outputs."""
    (layer,) = ctx.get(DecoderLayers).layers
    args = attention_args(layer.attention)
    outputs = SaliencyOutputs(args["query"], args["key"])
    output = gm.graph.output_node()
    output.args = (tuple(graph_outputs(gm)) + outputs.values(),)
    return PassResult(record=outputs, changed=True, counts={"layer": layer.index})


@graph_pass("mask_prune", requires=(VisualSpan, DecoderLayers), provides=PruneSite)
def prune_by_masking(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Layer K: select and recycle at its input, then go on over all N positions (``era::unprune``)."""
    span, (layer,) = ctx.get(VisualSpan), ctx.get(DecoderLayers).layers
    graph, step, K = gm.graph, ctx.step, ctx.config.resolved_layer
    cut = layer.hidden_in
    source = attention_args(layer.attention)  # the mask every layer receives from the loop, K - 1's too
    downstream = reachable_from([cut], through_sizes=False)
    downstream.discard(graph.output_node())
    first = schedule_upstream_first(graph, downstream)
    budget, budget_input = append_budget(gm, cut)
    added: list[AddedInput] = [budget_input]
    if K == 0:
        with graph.inserting_before(first):
            queries, keys = copy_unpruned(graph, [source["query"], source["key"]], downstream)
    else:
        if step is None or step.queries is None or step.keys is None:
            raise PassError(f"layer {K}: layer {K - 1}'s queries and keys did not reach it (its graph handed none on)")
        (queries, added_queries), (keys, added_keys) = (
            _walk_input(gm, cut, step.queries, "queries", seq_dim=2),
            _walk_input(gm, cut, step.keys, "keys", seq_dim=2),
        )
        added += [added_queries, added_keys]
    with graph.inserting_before(first):
        keep_index, hidden_kept, log_bias, samples = insert_selection(
            graph, ctx, span, cut, queries, keys, source, budget, source["attn_mask"]
        )
        unpruned = insert_call(
            graph,
            torch.ops.era.unprune.default,
            (),
            dict(
                hidden=cut,
                keep_index=keep_index,
                hidden_kept=hidden_kept,
                log_bias=log_bias,
                rectify=ctx.config.rectify,
            ),
            stem="unprune",
        )
        hidden_full, key_bias = getitem(graph, unpruned, 0, "hidden_full"), getitem(graph, unpruned, 1, "key_bias")
    cut.replace_all_uses_with(hidden_full, delete_user_cb=lambda user: user in downstream)
    site = PruneSite(
        K, keep_index, hidden_full, log_bias, samples, frozenset(downstream), source["attn_mask"], key_bias=key_bias
    )
    return PassResult(
        record=site, changed=True, counts={"layer": layer.index, "masked": True}, added_inputs=tuple(added)
    )


@graph_pass("mask_attention", requires=(DecoderLayers,), provides=RectifiedAttention)
def mask_pruned_keys(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """The layer's attention adds the key bias: the prune variant's own, or an input (masked)."""
    (layer,) = ctx.get(DecoderLayers).layers
    site = ctx.find(PruneSite)
    added = []
    if site is not None:
        bias = site.key_bias
        assert bias is not None  # the site of mask_prune, which always leaves a key bias
    else:
        if ctx.step is None or ctx.step.key_bias is None:
            raise PassError(f"layer {layer.index}: no key bias of the pruned tokens reached it")
        bias, added_bias = _walk_input(gm, layer.hidden_in, ctx.step.key_bias, "key_bias", seq_dim=1)
        added.append(added_bias)
    keys = attention_args(layer.attention)["key"]
    if not same_size(tensor_value(keys).shape[-2], tensor_value(bias).shape[-1]):
        raise PassError(
            f"layer {layer.index}: its keys are not the prompt's positions (a non-empty KV cache in "
            "prefill is not supported)"
        )
    biased = replace_with_biased_attention(gm.graph, layer.attention, bias, ctx.config.attention, layer.index)
    record = RectifiedAttention(((layer.index, biased),), call_arguments(biased)["kernel"])
    return PassResult(
        record=record,
        changed=True,
        counts={"attention_rewrites": 1, "layers": [layer.index]},
        added_inputs=tuple(added),
    )


def _walk_input(
    gm: fx.GraphModule, hidden: fx.Node, example: torch.Tensor, field: str, seq_dim: int
) -> tuple[fx.Node, WalkInput]:
    """A placeholder for what the runtime's walk holds (``field``), shaped as ``example`` with the
    hidden states' batch and length (symbolic in a dynamic graph) at dims 0 and ``seq_dim``."""
    value = tensor_value(hidden)
    shape = list(example.shape)
    shape[0], shape[seq_dim] = value.shape[0], value.shape[1]
    node = append_input(gm, f"era_{field}", value, shape, example.dtype)
    return node, WalkInput(node.name, node.meta["val"], field=field)
