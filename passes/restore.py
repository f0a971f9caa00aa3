"""restore: a split decoder's layer from K on hands back hidden states of the prompt's length.

In a decoder that Dynamo split into per-layer graphs (``saliency`` tells why), what a layer graph
returns goes to the eager loop (DeepStack's ``h[visual_mask] + features`` runs there, on [B, N]) and
to the next layer's frame, which Dynamo traced on the whole prompt: both expect [B, N, D]. So the
states the layer computed at the kept tokens [B, n', D] are written back to their positions over the
layer's own input (``era::unprune``). A pruned position keeps the state it entered with, and nothing
reads it again: the next layer cuts the sequence again at its entry (``kept``), decode reads the
cache, and the last position, the one generation reads, is text, always kept. A left-padding slot of
a ragged batch (``BLOCKED`` bias) writes nothing. The KV-cache outputs stay at n': the runtime makes
them ``CompactKV``, as after a one-graph prefill. Any other output along the kept tokens is refused.

``era::unprune`` also gives the key bias [B, N] (the kept tokens' ``log b``, ``BLOCKED`` elsewhere):
layer K returns it (``publish``), and every later layer reads its cut from it (``kept``).

Before (after ``prune`` or ``kept``)::

    return (h_out_kept, keys, values)                   # [B, n', D], [B, H, n', d] x 2

After::

    h_out, key_bias = era::unprune(l_args_0_, keep, h_out_kept, log_bias, rectify)
    return (h_out, keys, values)                        # [B, N, D], [B, H, n', d] x 2
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import data_dependent_dims, graph_outputs, same_shape, tensor_value
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .records import DecoderLayers, KVCache, PruneSite, RestoredSequence
from .rewrite import getitem, insert_call


@graph_pass("restore", requires=(DecoderLayers, KVCache, PruneSite), provides=RestoredSequence)
def restore_sequence_length(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    (layer,) = ctx.get(DecoderLayers).layers
    site, cache = ctx.get(PruneSite), ctx.get(KVCache)
    caches = {i for c in cache.layers for i in (c.keys_output, c.values_output) if i is not None}
    kept_shape = tensor_value(site.hidden_kept).shape
    outputs = list(graph_outputs(gm))
    graph = gm.graph
    restored: list[int] = []
    key_bias = None
    for i in sorted(set(data_dependent_dims(gm)) - caches):  # along the kept tokens; the caches are the runtime's
        out = outputs[i]
        value = tensor_value(out)
        if not same_shape(value, kept_shape):
            raise PassError(
                f"layer {layer.index} returns {out.name} {list(value.shape)} along the kept tokens, which is "
                "neither hidden states [B, n', D] nor its KV cache: the loop between the layer graphs cannot take it"
            )
        if value.dtype != tensor_value(layer.hidden_in).dtype:  # written over the input, in its dtype
            raise PassError(
                f"layer {layer.index} returns its hidden states in {value.dtype}, not its input's "
                f"{tensor_value(layer.hidden_in).dtype}: they cannot be written back over it"
            )
        with graph.inserting_before(graph.output_node()):
            unpruned = insert_call(
                graph,
                torch.ops.era.unprune.default,
                (),
                dict(
                    hidden=layer.hidden_in,
                    keep_index=site.keep_index,
                    hidden_kept=out,
                    log_bias=site.log_bias,
                    rectify=ctx.config.rectify,
                ),
                stem="unprune",
            )
            outputs[i] = getitem(graph, unpruned, 0, "hidden_full")
            if key_bias is None:
                key_bias = getitem(graph, unpruned, 1, "key_bias")
        restored.append(i)
    if key_bias is None:
        raise PassError(f"layer {layer.index} returns no hidden states along the kept tokens")
    graph.output_node().args = (tuple(outputs),)
    return PassResult(
        record=RestoredSequence(tuple(restored), key_bias), changed=True, counts={"restored_outputs": restored}
    )
