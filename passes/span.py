"""span: find where image features enter the sequence.

Hugging Face VLMs splice the projected image features into the text embeddings with
``inputs_embeds.masked_scatter(mask, features)`` (``normalize`` folds the other spellings,
index assignment included), the mask being ``input_ids == <image id>`` (computed here or in an
earlier graph). Two other merges are found by pattern (``kinds``): ``torch.where(is_image,
features[slot], embeds)``, whose condition is the mask, and ``embeds.scatter(1, positions,
features)``, whose index gives it. This pass finds that merge and inserts a ``[B, N]`` visual
mask. How many visual tokens each sample holds is data, never a size of the graph: the pruning
ops count them on every call (one graph serves every image size and every ragged batch); this
pass records the example's total for the report only.

Before::

    embeds = l_inputs_embeds_.masked_scatter(l_stack0_, l_image_features_)   # mask [B,N,1]

After::

    embeds = l_inputs_embeds_.masked_scatter(l_stack0_, l_image_features_)
    era_visual_mask = torch.any(l_stack0_, -1)                               # bool [B,N]

When Dynamo splits the merge from the decoder (a plain Qwen2-VL forward), the merge's graph
hands its mask on with the merged embeddings (``handoff``), and the runtime passes it to the
decoder's graph (kind ``carried``). There the span is the embeddings input, and the mask a new
input (a ``VisualMaskInput`` the runtime supplies)::

    def forward(self, l_stack0_, l_inputs_embeds_, ..., era_visual_mask):   # bool [B,N]
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .fx_utils import hint, hints, is_masked_scatter, placeholders, tensor_meta, tensor_value
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .kinds import is_unfolded_assignment, scatter_merges, where_merges
from .records import VisualMaskInput, VisualSpan, WalkInput
from .rewrite import append_input, insert_call


@graph_pass("span", provides=VisualSpan, rewrites=False)
def find_visual_span(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.carried is not None:
        return _span_from_carried_mask(
            gm, ctx.carried.input_index, ctx.carried.mask, VisualMaskInput, source_input=ctx.carried.input_index
        )
    if ctx.step is not None:  # a decoder layer's own graph: the runtime's walk holds the merge's mask
        mask = ctx.step.visual_mask
        assert mask is not None, "only a prune step's graph looks for the span, and it carries the mask"
        return _span_from_carried_mask(gm, ctx.step.hidden_input, mask, WalkInput, field="visual_mask")
    selects, scatters = where_merges(gm, ctx.example_inputs), scatter_merges(gm, ctx.example_inputs)
    merges = [n for n in gm.graph.nodes if is_masked_scatter(n) or n in selects or n in scatters]
    if not merges and any(is_unfolded_assignment(n) for n in gm.graph.nodes):
        raise PassError(
            "image features are merged by a masked assignment (embeds[mask] = features), not "
            "masked_scatter, into a graph input (a write the caller sees): this merge form is not "
            "supported"
        )
    if len(merges) != 1:
        raise PassError(
            f"found {len(merges)} image merges ({', '.join(n.name for n in merges)}); one per graph is supported"
        )
    merge = merges[0]
    if merge in selects:
        return _span_of_where(gm, merge, inverted=selects[merge])
    if merge in scatters:
        return _span_of_scatter(gm, merge, *scatters[merge][:2])
    embeds, mask, features = (tensor_meta(a) for a in merge.args[:3])
    if embeds is None or mask is None or features is None or embeds.dim() != 3:
        raise PassError("masked_scatter merge without [B, N, D] embeddings, a mask and features")
    batch, seq_len, hidden = embeds.shape
    total_visual = math.prod(hints(features.shape)) // hint(hidden)
    if total_visual == 0:
        return PassResult(skipped="image features are empty (no visual tokens in this graph)")
    with gm.graph.inserting_after(merge):
        mask_node = merge.args[1]
        if mask.dim() == 3:
            visual_mask = insert_call(gm.graph, torch.any, (mask_node, -1), stem="visual_mask")
        elif mask.dim() == 2:
            visual_mask = mask_node
        else:
            raise PassError(f"image mask of rank {mask.dim()} (expected [B, N] or [B, N, 1])")
    span = VisualSpan(merge, visual_mask, batch, seq_len, total_visual)
    return PassResult(record=span, changed=True, counts={"visual_tokens": total_visual, "seq_len": hint(seq_len)})


def _span_of_where(gm: fx.GraphModule, merge: fx.Node, inverted: bool) -> PassResult:
    """``where(is_image, features, embeds)``: the features come at full length, so how many
    tokens are visual is in no shape, only in the condition (counted per call, as always)."""
    condition = merge.args[0]
    batch, seq_len, _ = tensor_value(merge).shape
    with gm.graph.inserting_before(merge.next):  # (inserting_after would put the two in reverse order)
        if inverted:  # True at the text: visual where no channel is taken from the embeddings
            visual_mask = insert_call(
                gm.graph,
                torch.logical_not,
                (insert_call(gm.graph, torch.all, (condition, -1), stem="text_mask"),),
                stem="visual_mask",
            )
        else:
            visual_mask = insert_call(gm.graph, torch.any, (condition, -1), stem="visual_mask")
    span = VisualSpan(merge, visual_mask, batch, seq_len, visual_tokens=None)
    return PassResult(
        record=span,
        changed=True,
        counts={"visual_tokens": "counted per call", "seq_len": hint(seq_len), "merge": "where"},
    )


def _span_of_scatter(gm: fx.GraphModule, merge: fx.Node, embeds: fx.Node, index: fx.Node) -> PassResult:
    """``embeds.scatter(1, index, features)``: the visual positions are the index's rows (one position
    per feature row, repeated along D), True in a [B, N] mask. Made from the embeddings written into,
    not the merge: at K = 0 what reads the merge runs after the selection that reads the mask."""
    batch, seq_len, _ = tensor_value(merge).shape
    graph, every = gm.graph, slice(None)
    with graph.inserting_before(merge.next):  # [B, N] False, then True at each sample's T positions
        positions = insert_call(graph, operator.getitem, (index, (every, every, 0)), stem="visual_positions")
        channel = insert_call(graph, operator.getitem, (embeds, (every, every, 0)), stem="first_channel")
        none = insert_call(graph, torch.zeros_like, (channel,), {"dtype": torch.bool}, stem="no_visual")
        visual_mask = insert_call(graph, torch.ops.aten.scatter.value, (none, 1, positions, True), stem="visual_mask")
    total = math.prod(hints(tensor_value(index).shape[:2]))
    span = VisualSpan(merge, visual_mask, batch, seq_len, total)
    return PassResult(
        record=span, changed=True, counts={"visual_tokens": total, "seq_len": hint(seq_len), "merge": "scatter"}
    )


def _span_from_carried_mask(
    gm: fx.GraphModule, input_index: int, mask: torch.Tensor, added_type, **added_fields
) -> PassResult:
    """The span is the input at ``input_index``; its visual mask (the example's ``mask``) a new input
    the runtime supplies (an ``added_type``: from the handed-on store, or from a split decoder's walk)."""
    embeds = placeholders(gm)[input_index]
    value = tensor_meta(embeds)
    # a dynamic size is this call's, whatever its hint (the graph's first example) says; the mask is
    # [B, N] (the runtime's), compared with the embeddings' first two dims
    if (
        value is None
        or value.dim() != 3
        or any(isinstance(n, int) and n != m for n, m in zip(value.shape[:2], mask.shape, strict=False))
    ):
        raise PassError(
            f"input {embeds.name} carries a visual mask of shape {list(mask.shape)}, "
            "which does not match its [B, N] dimensions"
        )
    batch, seq_len, _ = value.shape
    visual_mask = append_input(gm, "era_visual_mask", value, value.shape[:2], torch.bool)  # B, N as the embeddings'
    added = added_type(visual_mask.name, visual_mask.meta["val"], **added_fields)
    total_visual = int(mask.sum())
    span = VisualSpan(embeds, visual_mask, batch, seq_len, total_visual, carried_by_input=input_index)
    return PassResult(
        record=span,
        changed=True,
        added_inputs=(added,),
        counts={"visual_tokens": total_visual, "seq_len": hint(seq_len), "carried_by_input": input_index},
    )
