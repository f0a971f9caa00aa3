"""publish: hand what the pruned prefill decided to the runtime, as trailing graph outputs.

The cache of layers >= K holds only the kept tokens; a later decode step needs, for each
cached key, its LAR bias. The outputs are the fields of ``records.PrefillOutputs``, in order:
this pass builds it from nodes, the runtime strips the same fields from the outputs.

After::

    return (..., keys_2, values_2, ..., era_keep_index, era_log_bias, era_last_query_mask)

``key_visible`` [B, N] (present when the attention has a mask) says which of the original
positions the last query may see; a False there is a padding key, and a padded batch needs
its cache laid out at the original positions (see ``runtime``), N long.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import tensor_meta
from .graph_pass import PassContext, PassResult, graph_pass
from .records import PrefillOutputs, PruneSite
from .rewrite import insert_call


@graph_pass("publish", requires=(PruneSite,), provides=PrefillOutputs)
def publish_pruning(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    site = ctx.get(PruneSite)
    graph = gm.graph
    output = graph.output_node()
    mask, key_visible = site.attention_mask, None
    with graph.inserting_before(output):
        if mask is not None:
            key_visible = insert_call(graph, operator.getitem, (mask, (slice(None), 0, -1, slice(None))),
                                      stem="last_query_mask")
            dtype = tensor_meta(mask).dtype
            if dtype != torch.bool:  # an additive float mask: blocked keys are very negative
                key_visible = insert_call(graph, torch.gt, (key_visible, torch.finfo(dtype).min / 2),
                                          stem="last_query_visible")
    published = PrefillOutputs(site.keep_index, site.log_bias, key_visible)
    output.args = (tuple(output.args[0]) + published.values(),)
    return PassResult(record=published, changed=True, counts={"extra_outputs": len(published.values())})
