"""decode: attention over a cache that a pruned prefill wrote keeps the anchors' bias.

In a decode step (or any call that extends an existing cache) layers >= K attend over
their cached keys plus the new ones. The cached keys' LAR bias was decided in prefill; the
runtime wrapper finds it from the identity of the cached key tensors and ``era::cache_bias``
reads it. New keys get bias 0.

Before::

    keys = torch.cat([l_past_keys_2, k_embed], dim=-2)
    out = torch._C._nn.scaled_dot_product_attention(q, keys, values, attn_mask=m, scale=0.25)

After::

    keys = torch.cat([l_past_keys_2, k_embed], dim=-2)
    past_bias = torch.ops.era.cache_bias(l_past_keys_2, 2)                 # [B, L_past]
    bias = torch.cat([past_bias, torch.zeros_like(k_embed[:, 0, :, 0])], -1)  # new keys: 0
    out = torch.ops.era.biased_attention(q, keys, values, bias, m, False, 0.25, "sdpa")
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import PassContext, PassError, PassResult, insert_call, is_sdpa, replace_with_biased_attention


def rectify_cached_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("decode")
    K = ctx.config.layer
    todo = [c for c in ctx.cache_layers if c.index >= K and c.past_keys is not None]
    if not todo:
        result.skipped = "no attention over a past KV cache in layers >= K"
        return result
    graph = gm.graph
    for layer in todo:
        call = layer.attention
        if not is_sdpa(call):
            raise PassError(f"layer {layer.index}: expected a scaled_dot_product_attention call")
        new_keys = layer.keys.args[0][1]
        with graph.inserting_before(call):
            past_bias = insert_call(graph, torch.ops.era.cache_bias.default, (layer.past_keys, layer.index),
                                    stem=f"cache_bias_{layer.index}")
            # zeros shaped like the new keys' [B, L_new] slice: no size (static or symbolic) is
            # written into the graph, and cat (unlike F.pad) keeps the cache length symbolic
            one_head = insert_call(graph, operator.getitem, (new_keys, (slice(None), 0, slice(None), 0)),
                                   stem=f"new_keys_{layer.index}")
            new_bias = insert_call(graph, torch.zeros_like, (one_head,), {"dtype": torch.float32},
                                   stem=f"new_bias_{layer.index}")
            bias = insert_call(graph, torch.cat, ([past_bias, new_bias], -1), stem=f"bias_{layer.index}")
        layer.attention = replace_with_biased_attention(graph, call, bias, ctx.config.attention, layer.index)
        ctx.kernel = layer.attention.args[7]
    result.changed = True
    result.counts = {"attention_rewrites": len(todo), "layers": [layer.index for layer in todo]}
    return result
