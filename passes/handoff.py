"""handoff: a graph that merges image features but runs no decoder layer passes its visual
mask on, as an extra output beside the merged embeddings.

Dynamo splits a plain Qwen2-VL forward into a graph that ends with the merge and a later
graph that runs the decoder on the merged embeddings. The runtime attaches the mask to the
embeddings tensor (by identity) and feeds it to whichever graph receives that tensor, where
``span`` takes it up. Nothing is global: the mask travels with the tensor it describes.

After::

    return (inputs_embeds, ..., era_visual_mask)      # the runtime strips the last output
"""

from __future__ import annotations

import torch.fx as fx

from .graph import PassContext, PassError, PassResult


def hand_off_visual_mask(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("handoff")
    span = ctx.span
    output = gm.graph.output_node()
    outputs = list(output.args[0])
    # the merge's own result must leave the graph: what is computed from it (a projection, a
    # norm) no longer holds the merged embeddings the decoder's graph will receive
    carriers = [i for i, o in enumerate(outputs) if o is span.merge]
    if len(carriers) != 1:
        raise PassError("no decoder layer after the image merge in this graph, and the merged embeddings are "
                        f"{'not an output' if not carriers else 'returned more than once'}: the visual "
                        "positions cannot be handed on to the graph that runs the decoder")
    output.args = (tuple(outputs) + (span.visual_mask,),)
    ctx.handoff_output = carriers[0]
    result.changed = True
    result.counts = {"handoff_output": carriers[0], "visual_tokens": span.num_visual}
    return result

