"""The one classifier: what kind of graph Dynamo handed over, which decides the passes it gets.

Backend, pass manager and runtime all read this answer; nothing else decides it. It runs on
a normalised graph (``normalize`` first), so it matches one spelling of each op.

=========  =========================================================  ==============================
kind       what the graph holds                                       passes (``manager.PIPELINES``)
=========  =========================================================  ==============================
prefill    an image merge and decoder layers after it                 span layers kvcache prune
                                                                      attention publish
handoff    an image merge and no decoder layer after it (Dynamo       span handoff
           split the forward): its mask is handed on
carried    decoder layers on merged embeddings an earlier graph       span layers kvcache prune
           handed on (decided per call by the runtime: ``carried``)   attention publish
decode     attention over a past KV cache, no image merge             kvcache (which layers attend
                                                                      over a pruned CompactKV cache)
text       none of these: a text-only prompt, a vision tower, a head  none
=========  =========================================================  ==============================
"""

from __future__ import annotations

import enum
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .fx_utils import (attention_args, call_arguments, is_attention, is_cat, is_masked_scatter, is_weight, layer_module_path, placeholders,
                       reachable_from, sequence_source, tensor_meta)


class GraphKind(enum.Enum):
    PREFILL = "prefill"
    HANDOFF = "handoff"
    CARRIED = "carried"
    DECODE = "decode"
    TEXT = "text"

    @property
    def has_image(self) -> bool:
        return self in (GraphKind.PREFILL, GraphKind.HANDOFF, GraphKind.CARRIED)

    @property
    def may_receive_embeddings(self) -> bool:
        """Graphs an earlier graph's merged embeddings can reach (the runtime checks per call)."""
        return not self.has_image


def classify(gm: fx.GraphModule, carried: Optional[Any] = None, example_inputs=()) -> GraphKind:
    """The kind of a normalised graph; ``carried``: the visual mask that reached one of its inputs."""
    merges = [n for n in gm.graph.nodes if is_masked_scatter(n) or is_unfolded_assignment(n)]
    if carried is not None:
        return GraphKind.CARRIED
    if merges:
        after = reachable_from(merges)
        decoder = any(is_attention(n) or layer_module_path(n) is not None for n in after)
        return GraphKind.PREFILL if decoder else GraphKind.HANDOFF
    if attends_over_past_cache(gm, example_inputs):
        return GraphKind.DECODE
    return GraphKind.TEXT


def is_unfolded_assignment(node: fx.Node) -> bool:
    """``x[mask] = y`` on [B, N, D] float embeddings with a bool mask that ``normalize`` left as it
    was (it writes into a graph input): an image merge this project cannot rewrite, to be named."""
    if not (node.op == "call_function" and node.target is operator.setitem):
        return False
    target, index = tensor_meta(node.args[0]), tensor_meta(node.args[1])
    return (target is not None and index is not None and target.dim() == 3 and target.is_floating_point()
            and index.dtype == torch.bool)


def attends_over_past_cache(gm: fx.GraphModule, example_inputs=()) -> bool:
    """Some attention's keys are, or are concatenated from, a non-weight 4-D graph input."""
    inputs = placeholders(gm)
    examples = list(example_inputs) + [None] * (len(inputs) - len(example_inputs))
    cache_inputs = {n for n, x in zip(inputs, examples) if _is_cache_like(n) and not is_weight(n, x)}
    for node in gm.graph.nodes:
        if not is_attention(node):
            continue
        source = sequence_source(attention_args(node)["key"])
        parts = call_arguments(source)["tensors"] if isinstance(source, fx.Node) and is_cat(source) else [source]
        if any(sequence_source(p) in cache_inputs for p in parts if isinstance(p, fx.Node)):
            return True
    return False


def _is_cache_like(node: fx.Node) -> bool:
    t = tensor_meta(node)
    return t is not None and t.dim() == 4 and t.is_floating_point()
