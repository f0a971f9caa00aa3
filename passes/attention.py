"""attention: LAR. The attention of every layer >= K adds the anchors' log bias to its logits.

Before::

    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.0, is_causal=False, scale=0.25, ...)

After::

    out = torch.ops.era.biased_attention(q=q, k=k, v=v, bias=log_bias, attn_mask=m, causal=False,
                                         scale=0.25, kernel="sdpa")

``log_bias`` [B, n'] is ``log b`` for each kept anchor key, 0 for text and ``BLOCKED`` for an empty
slot of a ragged batch. With ``rectify=False`` the calls are rewritten all the same, with the bias
``without_lar(log_bias)`` (0, still ``BLOCKED`` at an empty slot): an empty slot repeats position 0,
which in an unpadded sample holds a token, and no attention mask hides it. The keys of
these layers are exactly the kept tokens (a prefill with an empty cache), which the pass
checks; in decode the pruned layers' caches (``era_compile.compact_kv.CompactKV``) add the bias
in their own attention. A split decoder's layer graph from K on holds one such layer, cut at its
own entry (``prune`` at K, ``kept`` after it).
"""

from __future__ import annotations

import torch.fx as fx

from era_compile.ops.prune import without_lar

from .fx_utils import attention_args, call_arguments, same_size, tensor_value
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .records import DecoderLayers, PruneSite, RectifiedAttention
from .rewrite import insert_call, replace_with_biased_attention


@graph_pass("attention", requires=(DecoderLayers, PruneSite), provides=RectifiedAttention)
def rectify_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    site, layers = ctx.get(PruneSite), ctx.get(DecoderLayers)
    bias = site.log_bias if ctx.config.rectify else _without_lar(gm.graph, site.log_bias)
    calls, kernel = [], None
    for layer in (layer for layer in layers.layers if layer.index >= site.layer):
        call = layer.attention
        key_len = tensor_value(attention_args(call)["key"]).shape[-2]
        if not same_size(key_len, tensor_value(site.hidden_kept).shape[1]):
            raise PassError(
                f"layer {layer.index}: its keys are not the kept tokens (a non-empty KV cache in prefill "
                "is not supported yet)"
            )
        biased = replace_with_biased_attention(gm.graph, call, bias, ctx.config.attention, layer.index)
        kernel = call_arguments(biased)["kernel"]
        calls.append((layer.index, biased))
    record = RectifiedAttention(tuple(calls), kernel, lar=ctx.config.rectify)
    return PassResult(
        record=record,
        changed=bool(calls),
        counts={"attention_rewrites": len(calls), "layers": record.layers, "lar": record.lar},
    )


def _without_lar(graph: fx.Graph, log_bias: fx.Node) -> fx.Node:
    """A call of ``without_lar(log_bias)`` right after ``log_bias`` (the compiler traces into it)."""
    with graph.inserting_after(log_bias):
        return insert_call(graph, without_lar, (log_bias,), stem="without_lar")
