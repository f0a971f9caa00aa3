"""The pass pipeline: span -> layers -> prune -> attention, each checked before the next.

After every pass that changed the graph, the graph is linted and recompiled and fake
tensors are propagated through it again: a rewrite whose shapes do not check fails here,
with the pass named, not later inside the inner compiler. Dead nodes go at the end (a
pass may add a node that only a later pass uses).
"""

from __future__ import annotations

from typing import Callable, List

import torch.fx as fx

from .attention import rectify_attention
from .graph import PassContext, PassError, PassResult, finish, propagate_fake
from .layers import find_decoder_layers
from .prune import prune_visual_tokens
from .span import find_visual_span

Pass = Callable[[fx.GraphModule, PassContext], PassResult]

PIPELINE: List[Pass] = [find_visual_span, find_decoder_layers, prune_visual_tokens, rectify_attention]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> List[PassResult]:
    """Run the passes in order; stop quietly after the first one that finds nothing to do."""
    results: List[PassResult] = []
    for p in PIPELINE:
        result = p(gm, ctx)
        results.append(result)
        if result.changed:
            finish(gm)
            try:
                propagate_fake(gm, ctx.example_inputs)
            except Exception as e:
                raise PassError(f"after pass {result.name!r} the graph no longer type-checks: "
                                f"{type(e).__name__}: {e}") from e
        if result.skipped and result.name == "span":
            return results
    finish(gm, drop_dead=True)
    return results
