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

import torch
import torch.fx as fx

from era_compile.ops.attention import resolve_kernel

from .graph import PassContext, PassError, PassResult, hint, insert_call, same_size, sdpa_arg, tensor_meta


def rectify_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("attention")
    site = ctx.prune_site
    if not ctx.config.rectify:
        result.skipped = "rectify=False: attention of the pruned layers left as plain SDPA"
        return result
    rewritten = 0
    kernel = None
    for layer in ctx.layers[site.layer:]:
        call = layer.attention
        q, k, v = (sdpa_arg(call, n) for n in ("query", "key", "value"))
        if float(sdpa_arg(call, "dropout_p", 0.0) or 0.0) != 0.0:
            raise PassError(f"layer {layer.index}: attention with dropout (training?) cannot be rectified")
        key_len = tensor_meta(k).shape[-2]
        if not same_size(key_len, site.kept_len):
            raise PassError(f"layer {layer.index}: its keys hold {hint(key_len)} positions, not the "
                            f"{site.seq_len_after} kept tokens (a non-empty KV cache in prefill is not supported yet)")
        kernel = resolve_kernel(ctx.config.attention, tensor_meta(q))
        with gm.graph.inserting_before(call):
            biased = insert_call(
                gm.graph, torch.ops.era.biased_attention.default,
                (q, k, v, site.log_bias, sdpa_arg(call, "attn_mask"), bool(sdpa_arg(call, "is_causal", False)),
                 sdpa_arg(call, "scale"), kernel),
                stem=f"biased_attention_{layer.index}")
        biased.meta.update({k_: call.meta[k_] for k_ in ("nn_module_stack", "stack_trace") if k_ in call.meta})
        call.replace_all_uses_with(biased)
        gm.graph.erase_node(call)
        site.downstream.discard(call)
        site.downstream.add(biased)
        layer.attention = biased
        rewritten += 1
    result.changed = rewritten > 0
    result.counts = {"attention_rewrites": rewritten}
    ctx.kernel = kernel
    return result
