"""kept: a split decoder's layer after K runs on the tokens layer K kept.

In a decoder that Dynamo split into per-layer graphs (``saliency`` tells why), the eager loop hands
each layer the whole prompt: hidden states [B, N, D], cos/sin [B, N, d], a mask [B, 1, N, N]. Layer
K's graph wrote its kept states back to their positions at its exit and published a key bias [B, N]
(``restore``: the kept tokens' ``log b``, ``BLOCKED`` elsewhere), which the runtime's walk supplies to
every later layer. Here, at the layer's entry, ``era::kept_tokens`` reads the kept positions and
their bias off it, laid out as layer K's ``era::recycle`` laid them out (so the caches' rows line up
with layer K's); the hidden states are gathered there, and the rest follows as after a one-graph
prefill's cut (``prune.continue_on_kept``: cos/sin and mask gathered, length literals at n'). ``n'``
is an unbacked size, the data's, as ``era::recycle``'s: one compiled variant serves every image.

Before::

    def forward(self, l_args_0_, ..., l_kwargs_position_embeddings_0_, ..., l_kwargs_attention_mask_):
        x = rms_norm(l_args_0_) ... view(x, (1, N, -1, 16)) ... sdpa(q * cos ..., attn_mask=mask)
        return (h_out, keys, values)                       # [B, N, D], [B, H, N, d] x 2

After::

    def forward(self, ..., era_key_bias):                  # float32 [B, N]
        keep, log_bias = era::kept_tokens(era_key_bias)    # [B, n']
        h_kept = gather(l_args_0_, 1, keep[..., None].expand(...))
        cos_kept = gather(cos, 1, keep...); mask_kept = gather(gather(mask, 2, keep...), 3, keep...)
        x = rms_norm(h_kept) ... view(x, (1, n', -1, 16)) ... sdpa(q * cos_kept ..., attn_mask=mask_kept)
        return (h_out_kept, keys, values)                  # [B, n', D], [B, H, n', d] x 2: ``restore`` next
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import attention_args, reachable_from, tensor_value
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .prune import continue_on_kept, gather_kept, schedule_upstream_first
from .records import DecoderLayers, PruneSite
from .rewrite import append_walk_input, getitem, insert_call


@graph_pass("kept", requires=(DecoderLayers,), provides=PruneSite)
def continue_on_kept_tokens(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    (layer,) = ctx.get(DecoderLayers).layers
    step = ctx.step
    if step is None or step.key_bias is None:
        raise PassError(f"layer {layer.index}: layer {ctx.config.resolved_layer}'s key bias did not reach it")
    graph, cut = gm.graph, layer.hidden_in
    mask = attention_args(layer.attention)["attn_mask"]
    downstream = reachable_from([cut], through_sizes=False)
    downstream.discard(graph.output_node())
    first = schedule_upstream_first(graph, downstream)
    key_bias, added = append_walk_input(gm, cut, step.key_bias, "key_bias", seq_dim=1)
    with graph.inserting_before(first):
        kept = insert_call(graph, torch.ops.era.kept_tokens.default, (), dict(key_bias=key_bias), stem="kept_tokens")
        keep_index, log_bias = getitem(graph, kept, 0, "keep_index"), getitem(graph, kept, 1, "log_bias")
        hidden_kept = gather_kept(graph, cut, (1,), keep_index, tensor_value(cut).shape[0])
    counts = continue_on_kept(gm, ctx, cut, downstream, first, keep_index, hidden_kept)
    site = PruneSite(layer.index, keep_index, hidden_kept, log_bias, None, frozenset(downstream), mask)
    return PassResult(record=site, changed=True, counts={"layer": layer.index, **counts}, added_inputs=(added,))
