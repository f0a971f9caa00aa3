"""handoff: a graph that merges image features but runs no decoder layer passes its visual
mask on, as a trailing output beside the merged embeddings (``records.HandoffOutputs``).

Dynamo splits a plain Qwen2-VL forward into a graph that ends with the merge and a later
graph that runs the decoder on the merged embeddings. The runtime attaches the mask to the
embeddings tensor (by identity) and feeds it to whichever graph receives that tensor, where
``span`` takes it up (kind ``carried``). Nothing is global: the mask travels with the tensor
it describes.

After::

    return (inputs_embeds, ..., era_visual_mask)      # the runtime strips the last output
"""

from __future__ import annotations

import torch.fx as fx

from .fx_utils import graph_outputs
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .records import Handoff, HandoffOutputs, VisualSpan


@graph_pass("handoff", requires=(VisualSpan,), provides=Handoff)
def hand_off_visual_mask(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    span = ctx.get(VisualSpan)
    outputs = graph_outputs(gm)
    # the merge's own result must leave the graph: what is computed from it (a projection, a
    # norm) no longer holds the merged embeddings the decoder's graph will receive
    carriers = [i for i, o in enumerate(outputs) if o is span.merge]
    if len(carriers) != 1:
        raise PassError(
            "no decoder layer after the image merge in this graph, and the merged embeddings are "
            f"{'not an output' if not carriers else 'returned more than once'}: the visual "
            "positions cannot be handed on to the graph that runs the decoder"
        )
    trailing = HandoffOutputs(span.visual_mask)
    gm.graph.output_node().args = (tuple(outputs) + trailing.values(),)
    record = Handoff(carriers[0], trailing)
    return PassResult(
        record=record, changed=True, counts={"handoff_output": carriers[0], "visual_tokens": span.visual_tokens}
    )
