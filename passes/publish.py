"""publish: hand what the pruned prefill decided to the runtime, as extra graph outputs.

The cache of layers >= K holds only the kept tokens; a later decode step needs, for each
cached key, its LAR bias. The runtime wrapper strips these trailing outputs and attaches
them to the cached key tensors (``era_compile.runtime``).

After::

    return (..., keys_2, values_2, ..., era_keep_index, era_log_bias, era_key_visible)

``era_key_visible`` [B, N] (present when the attention has a mask) says which of the original
positions the last query may see; a False there is a padding key, and a padded batch needs
its cache laid out at the original positions (see ``runtime``), N long.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import PassContext, PassResult, insert_call, tensor_meta

EXTRA_OUTPUTS = ("keep_index", "log_bias", "key_visible")


def publish_pruning(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("publish")
    site = ctx.prune_site
    graph = gm.graph
    output = graph.output_node()
    extra = [site.keep_index, site.log_bias]
    mask = site.attention_mask
    with graph.inserting_before(output):
        if mask is not None:
            last_row = insert_call(graph, operator.getitem, (mask, (slice(None), 0, -1, slice(None))),
                                   stem="last_query_mask")
            dtype = tensor_meta(mask).dtype
            if dtype != torch.bool:  # an additive float mask: blocked keys are very negative
                last_row = insert_call(graph, torch.gt, (last_row, torch.finfo(dtype).min / 2),
                                       stem="last_query_visible")
            extra.append(last_row)
    output.args = (tuple(output.args[0]) + tuple(extra),)
    ctx.extra_outputs = len(extra)
    result.changed = True
    result.counts = {"extra_outputs": len(extra)}
    return result
