"""decode: attention over a cache that a pruned prefill wrote keeps the anchors' bias.

In a decode step (or any call that extends an existing cache) layers >= K attend over
their cached keys plus the new ones. The cached keys' LAR bias was decided in prefill and
travels with the cache: the runtime looks it up by the identity of the past-key tensor and
passes it to the graph as an input (``records.PastBiasInput``), so the graph stays a function
of its inputs. New keys get bias 0.

Before::

    keys = torch.cat([l_past_keys_2, k_embed], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=m, scale=0.25, ...)

After::

    def forward(self, ..., era_past_bias_2):                               # [B, L_past] float32
    keys = torch.cat([l_past_keys_2, k_embed], dim=2)
    bias = torch.cat([era_past_bias_2, torch.zeros_like(k_embed[:, 0, :, 0])], -1)  # new keys: 0
    out = torch.ops.era.biased_attention(q=q, k=keys, v=values, bias=bias, attn_mask=m, ...)
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import call_arguments, is_attention, is_sdpa, layer_index, placeholders, tensor_meta
from .graph_pass import PassContext, PassError, PassResult, graph_pass
from .kvcache import cache_write_of
from .records import CacheBiasRead, KVCache, PastBiasInput
from .rewrite import append_input, insert_call, replace_with_biased_attention


@graph_pass("decode", requires=(KVCache,), provides=CacheBiasRead)
def rectify_cached_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cache, K = ctx.get(KVCache), ctx.config.layer
    todo = {c.index: c for c in cache.layers if c.index >= K and c.past_keys is not None}
    if not todo:
        return PassResult(record=CacheBiasRead(), skipped="no attention over a past KV cache in layers >= K")
    graph = gm.graph
    inputs = placeholders(gm)
    calls, added, kernel = [], [], None
    for call in [n for n in graph.nodes if is_attention(n) and layer_index(n) in todo]:
        layer = todo[layer_index(call)]
        if cache_write_of(call)[0] is not layer.keys:
            continue  # another attention in the same layer module
        if not is_sdpa(call):
            raise PassError(f"layer {layer.index}: expected a scaled_dot_product_attention call")
        past = tensor_meta(layer.past_keys)
        past_bias = append_input(gm, f"era_past_bias_{layer.index}", past, (past.shape[0], past.shape[-2]),
                                 torch.float32)
        added.append(PastBiasInput(past_bias.name, past_bias.meta["val"], layer=layer.index,
                                   past_keys_input=inputs.index(layer.past_keys)))
        new_keys = call_arguments(layer.keys)["tensors"][1]  # cat([past, new], dim=2)
        with graph.inserting_before(call):
            # zeros shaped like the new keys' [B, L_new] slice: no size (static or symbolic) is
            # written into the graph, and cat (unlike F.pad) keeps the cache length symbolic
            one_head = insert_call(graph, operator.getitem, (new_keys, (slice(None), 0, slice(None), 0)),
                                   stem=f"new_keys_{layer.index}")
            new_bias = insert_call(graph, torch.zeros_like, (one_head,), {"dtype": torch.float32},
                                   stem=f"new_bias_{layer.index}")
            bias = insert_call(graph, torch.cat, ([past_bias, new_bias],), {"dim": 1}, stem=f"bias_{layer.index}")
        biased = replace_with_biased_attention(graph, call, bias, ctx.config.attention, layer.index)
        kernel = call_arguments(biased)["kernel"]
        calls.append((layer.index, biased))
    missing = sorted(set(todo) - {index for index, _ in calls})
    if missing:
        raise PassError(f"layers {missing} write a KV cache over past keys but no attention call reads it")
    record = CacheBiasRead(tuple(calls), kernel, tuple(added))
    return PassResult(record=record, changed=True, added_inputs=tuple(added),
                      counts={"attention_rewrites": len(calls), "layers": record.layers})
