"""publish: hand what the pruned prefill decided to the runtime, as trailing graph outputs.

The cache of layers >= K holds only the kept tokens; a later decode step needs, for each
cached key, its original position and its LAR bias. The outputs are the fields of
``records.PrefillOutputs``, in order: this pass builds it from nodes, the runtime strips the
same fields from the outputs and gives the pruned layers' caches them (``CompactKV``).

After::

    return (..., keys_2, values_2, ..., era_keep_index, era_log_bias, era_last_query_mask, era_samples)

A split decoder's layer K returns the key bias [B, N] ``restore`` made last: its later layers cut
their sequence by it (``kept``).

``key_visible`` [B, N] says which of the original positions the last query may see (False: a
padding key); without a mask every one. Its length is the original N, the logical length the
runtime gives the pruned layers' caches (``era_compile.compact_kv``). ``samples`` [B, 2] is
what each sample held and kept in this call: the report's evidence that the call pruned.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import graph_outputs, tensor_value
from .graph_pass import PassContext, PassResult, graph_pass
from .records import PrefillOutputs, PruneSite, RestoredSequence, VisualSpan
from .rewrite import insert_call


@graph_pass("publish", requires=(VisualSpan, PruneSite), provides=PrefillOutputs)
def publish_pruning(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    site = ctx.get(PruneSite)
    graph = gm.graph
    output = graph.output_node()
    mask, span = site.attention_mask, ctx.get(VisualSpan)
    with graph.inserting_before(output):
        if mask is None:  # every key visible: ones shaped like the [B, N] visual mask (its N may be symbolic)
            key_visible = insert_call(graph, torch.ones_like, (span.visual_mask,), stem="key_visible")
        else:
            key_visible = insert_call(
                graph, operator.getitem, (mask, (slice(None), 0, -1, slice(None))), stem="last_query_mask"
            )
            dtype = tensor_value(mask).dtype
            if dtype != torch.bool:  # an additive float mask: blocked keys are very negative
                key_visible = insert_call(
                    graph, torch.gt, (key_visible, torch.finfo(dtype).min / 2), stem="last_query_visible"
                )
    restored = ctx.find(RestoredSequence)  # a split decoder's layer K
    assert site.samples is not None  # the site of ``prune``, which counts the samples
    published = PrefillOutputs(
        site.keep_index, site.log_bias, key_visible, site.samples, None if restored is None else restored.key_bias
    )
    output.args = (tuple(graph_outputs(gm)) + published.values(),)
    return PassResult(record=published, changed=True, counts={"extra_outputs": len(published.values())})
