"""attention: LAR. The attention of every layer >= K adds the anchors' log bias to its logits.

Before::

    out = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.25, is_causal=False)

After::

    out = torch.ops.era.biased_attention(q, k, v, log_bias, m, False, 0.25, "sdpa")

``log_bias`` [B, n'] is ``log b`` for each kept anchor key and 0 for text. The keys of
these layers are exactly the kept tokens (a prefill with an empty cache), which the pass
checks; decode-time rectification through the KV cache is a separate rewrite.
"""

from __future__ import annotations

import torch.fx as fx

from .graph import (PassContext, PassError, PassResult, hint, replace_with_biased_attention, same_size, sdpa_arg,
                    tensor_meta)


def rectify_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("attention")
    site = ctx.prune_site
    if not ctx.config.rectify:
        result.skipped = "rectify=False: attention of the pruned layers left as plain SDPA"
        return result
    rewritten = []
    for layer in ctx.layers[site.layer:]:
        call = layer.attention
        key_len = tensor_meta(sdpa_arg(call, "key")).shape[-2]
        if not same_size(key_len, site.kept_len):
            raise PassError(f"layer {layer.index}: its keys hold {hint(key_len)} positions, not the "
                            f"{site.seq_len_after} kept tokens (a non-empty KV cache in prefill is not supported yet)")
        biased = replace_with_biased_attention(gm.graph, call, site.log_bias, ctx.config.attention, layer.index)
        ctx.kernel = biased.args[7]
        site.downstream.discard(call)
        site.downstream.add(biased)
        layer.attention = biased
        rewritten.append(layer.index)
    result.changed = bool(rewritten)
    result.counts = {"attention_rewrites": len(rewritten), "layers": rewritten}
    return result
