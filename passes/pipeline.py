"""The pass pipeline, in one of two shapes decided by what the graph holds.

* A graph that merges image features (a prefill with an image), or receives embeddings an
  earlier graph merged: span -> layers -> prune -> attention -> kvcache -> publish.
* A graph that merges image features but holds no decoder layer (Dynamo split them):
  span -> layers (finds none) -> handoff.
* Any other graph (a decode step, a text-only prompt): span finds nothing, then
  kvcache -> decode, so layers >= K keep the anchors' bias over a cache a pruned prefill wrote.

After every pass that changed the graph, the graph is linted and recompiled and fake
tensors are propagated through it again: a rewrite whose shapes do not check fails here,
with the pass named, not later inside the inner compiler. Dead nodes go at the end (a
pass may add a node that only a later pass uses).
"""

from __future__ import annotations

from typing import Callable, List

import torch.fx as fx

from .attention import rectify_attention
from .decode import rectify_cached_attention
from .graph import PassContext, PassError, PassResult, finish, propagate_fake
from .handoff import hand_off_visual_mask
from .kvcache import find_kv_cache
from .layers import find_decoder_layers
from .prune import prune_visual_tokens
from .publish import publish_pruning
from .span import find_visual_span

Pass = Callable[[fx.GraphModule, PassContext], PassResult]

WITH_IMAGE: List[Pass] = [prune_visual_tokens, rectify_attention, find_kv_cache, publish_pruning]
WITHOUT_IMAGE: List[Pass] = [find_kv_cache, rectify_cached_attention]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> List[PassResult]:
    results: List[PassResult] = [_run(find_visual_span, gm, ctx)]
    if ctx.span is None:
        passes = WITHOUT_IMAGE
    else:
        results.append(_run(find_decoder_layers, gm, ctx))
        passes = WITH_IMAGE if ctx.layers else [hand_off_visual_mask]
    for p in passes:
        results.append(_run(p, gm, ctx))
    finish(gm, drop_dead=True)
    return results


def _run(p: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = p(gm, ctx)
    if result.changed:
        finish(gm)
        try:
            propagate_fake(gm, ctx.example_inputs)
        except Exception as e:
            raise PassError(f"after pass {result.name!r} the graph no longer type-checks: "
                            f"{type(e).__name__}: {e}") from e
    return result
