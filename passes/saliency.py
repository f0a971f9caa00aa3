"""saliency: layer K - 1 of a decoder split into per-layer graphs hands its queries and keys on.

A data-dependent op in the layer loop (DeepStack's ``h[visual_mask] + features`` after the first
layers) makes Dynamo trace each decoder layer as a frame of its own; the loop runs eagerly and hands
every layer the hidden states, position tables (cos/sin) and masks of the whole prompt [B, N]. The
runtime numbers the layers by call order (``runtime.LayerWalk``) and compiles one variant of a
layer's graph per part it plays (``records.LayerStep``); the layers before K - 1 run as Dynamo gave
them:

* ``saliency`` (layer K - 1, this pass): what layer K's selection scores with (ALGORITHMS.md 1.3)
  is in another graph, so its attention's queries and keys leave as trailing outputs
  (``SaliencyOutputs``), which the runtime supplies to layer K's graph as inputs::

      return (hidden, ..., era_queries, era_keys)

* ``prune`` (layer K): ``era::select`` and ``era::recycle`` cut the sequence at the layer's entry,
  as in a one-graph prefill (``prune``, reading those inputs), and the layer runs on the kept
  tokens;
* ``kept`` (after K): the layer's entry cuts the sequence where layer K did (``kept``).

From K on, each layer's exit writes its states back to their positions (``restore``): the loop and
the next layer's frame see the [B, N, D] they were traced with, and the caches hold the kept tokens
only, as a one-graph prefill's do.
"""

from __future__ import annotations

import torch.fx as fx

from .fx_utils import attention_args, graph_outputs
from .graph_pass import PassContext, PassResult, graph_pass
from .records import DecoderLayers, SaliencyOutputs


@graph_pass("saliency", requires=(DecoderLayers,), provides=SaliencyOutputs)
def hand_on_saliency(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Layer K - 1: its attention's queries and keys leave as trailing outputs."""
    (layer,) = ctx.get(DecoderLayers).layers
    args = attention_args(layer.attention)
    outputs = SaliencyOutputs(args["query"], args["key"])
    output = gm.graph.output_node()
    output.args = (tuple(graph_outputs(gm)) + outputs.values(),)
    return PassResult(record=outputs, changed=True, counts={"layer": layer.index})
