"""span: find where image features enter the sequence.

Hugging Face VLMs splice the projected image features into the text embeddings with
``inputs_embeds.masked_scatter(mask, features)``, the mask being ``input_ids == <image id>``
(computed here or in an earlier graph). This pass finds that merge, reads the number of
visual tokens per sample from the features' shape (in a dynamic graph from the example,
pinned by a guard: it fixes every pruned shape), and inserts a ``[B, N]`` visual mask.

Before::

    embeds = l_inputs_embeds_.masked_scatter(l_stack0_, l_image_features_)   # mask [B,N,1]

After::

    embeds = l_inputs_embeds_.masked_scatter(l_stack0_, l_image_features_)
    era_visual_mask = torch.any(l_stack0_, -1)                               # bool [B,N]
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .graph import (PassContext, PassError, PassResult, VisualSpan, hint, hints, insert_call, is_masked_scatter,
                    is_static, tensor_meta)


def find_visual_span(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("span")
    merges = [n for n in gm.graph.nodes if is_masked_scatter(n)]
    if not merges:
        result.skipped = "no masked_scatter merge of image features (no visual tokens in this graph)"
        return result
    if len(merges) > 1:
        raise PassError(f"found {len(merges)} masked_scatter merges; one per graph is supported")
    merge = merges[0]
    embeds, mask, features = (tensor_meta(a) for a in merge.args[:3])
    if embeds is None or mask is None or features is None or embeds.dim() != 3:
        raise PassError("masked_scatter merge without [B, N, D] embeddings, a mask and features")
    batch, seq_len, hidden = embeds.shape
    # The visual tokens per sample must be a constant of the compiled graph (the kept count
    # and every pruned shape follow from it). In a dynamic graph it is read from the example
    # and pinned with one guard: another image size recompiles instead of mis-pruning.
    total_visual = math.prod(hints(features.shape)) // hint(hidden)
    if total_visual == 0:
        result.skipped = "image features are empty (no visual tokens in this graph)"
        return result
    per_sample, rem = divmod(total_visual, hint(batch))
    if rem:
        raise PassError(f"{total_visual} visual tokens do not split evenly over a batch of {hint(batch)}; "
                        "samples with different numbers of visual tokens are not supported yet")
    rows = math.prod(features.shape) // hidden
    if not is_static(rows, batch):
        torch._check(rows == per_sample * batch)  # the guard: this graph serves this many visual tokens
    if hint(seq_len) < per_sample:
        raise PassError(f"{per_sample} visual tokens per sample but only {hint(seq_len)} positions")

    with gm.graph.inserting_after(merge):
        mask_node = merge.args[1]
        if mask.dim() == 3:
            visual_mask = insert_call(gm.graph, torch.any, (mask_node, -1), stem="visual_mask")
        elif mask.dim() == 2:
            visual_mask = mask_node
        else:
            raise PassError(f"image mask of rank {mask.dim()} (expected [B, N] or [B, N, 1])")
    ctx.span = VisualSpan(merge, visual_mask, batch, seq_len, per_sample)
    result.changed = True
    result.counts = {"visual_tokens": per_sample, "seq_len": hint(seq_len)}
    return result
