"""What runs around a compiled graph: what one graph decided reaches the next by tensor identity.

Two things travel that way, each in a per-backend store keyed weakly by a tensor's identity,
so an entry dies with its tensor and two requests or two models never share one:

* the visual mask, from a graph that merged image features but runs no decoder to the graph
  that receives the merged embeddings (a plain Qwen2-VL forward, see ``passes/handoff.py``);
* the LAR bias of the pruned cache, from a prefill to every decode step.

Visual mask. A graph that receives merged embeddings is compiled per visual-token count T
(its pruned shapes depend on T): ``dispatch`` looks its inputs up and runs, or compiles on
first sight, the variant for the T they carry; no carried mask means the unpruned variant. A
handed-on mask that no graph picks up is reported when its tensor dies: pruning did not happen.

The cache of layers >= K keeps plain, d-wide keys (widening them would break the next
decode trace, DESIGN.md section 4). Their bias lives beside them, in a ``CacheBiasStore``
keyed by the *identity* of the cached key tensors: a compiled graph's new cache tensors come
back, as the very same objects, as inputs of the next decode graph. An entry dies with its
cache, and two requests or two models never share a key tensor, so they never share a bias.

* After a pruned prefill: each cached key tensor of layers >= K gets its bias (``log b``
  on anchors, 0 on text; ``-inf`` where the position holds no token, see below).
* Before a decode step: each layer's past keys are looked up; the biases are exposed to
  ``era::cache_bias`` for that call. After it, the new cache tensors get the old bias
  extended by 0 for the new tokens.
* A past-key tensor the store does not know (a cache reordered or copied outside the graph,
  as beam search does) breaks the chain: ``strict`` raises; otherwise a warning, a report
  line and bias 0 for that step. Never a silent zero.

Cache layout. Hugging Face builds one decode mask for all layers, sized from layer 0's cache,
whenever an attention mask is passed (transformers 5.17 keeps even an all-ones mask in
generate(); 5.23 drops it). With K >= 1, compact caches in layers >= K would not match that
mask and the next decode step would fail inside Dynamo, before any backend runs. So:

* K >= 1 and the prefill had an attention mask: the pruned layers' K/V are laid out at their
  original positions (dropped tokens are zero rows that the bias gives ``-inf``);
* K = 0 (every layer is pruned, so layer 0's length fits them all): compact, unless there was
  padding (then aligned too, so HF's mask over original positions stays right);
* no mask: compact, the KV-memory saving kept.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from era_compile.ops.cache import cache_biases
from era_compile.report import Report, logger

BLOCKED = torch.finfo(torch.float32).min  # bias of a cache position that holds no token


class BrokenBiasChain(RuntimeError):
    """A decode step received cached keys whose bias this backend never recorded."""


@dataclass(eq=False)
class Handoff:
    """A merged-embeddings tensor's visual mask, waiting for the graph that runs the decoder."""

    mask: Tensor            # bool [B, N]
    num_visual: int         # T per sample, static in the graph that merged
    graph: int              # that graph's index, for messages
    claimed: bool = False


class CacheBiasStore:
    """``cached key tensor -> bias [B, L]`` by identity; entries die with their tensors."""

    def __init__(self):
        self._bias = WeakIdKeyDictionary()

    def record(self, keys: Tensor, bias: Tensor) -> None:
        self._bias[keys] = bias

    def lookup(self, keys: Tensor) -> Optional[Tensor]:
        return self._bias.get(keys)


@dataclass
class GraphPlan:
    """What the runtime does around one compiled graph (from the passes' context)."""

    keys_outputs: Dict[int, int] = field(default_factory=dict)    # layer -> output index
    values_outputs: Dict[int, int] = field(default_factory=dict)
    past_key_inputs: Dict[int, int] = field(default_factory=dict)  # layer -> input index
    extra_outputs: int = 0                      # trailing outputs added by ``publish``
    rectify: bool = True
    align_with_mask: bool = False               # K >= 1: any attention mask means aligned caches
    graph: int = 0
    handoff_output: Optional[int] = None        # merged embeddings handed on; their mask is the last output
    num_visual: int = 0                         # T of the handed-on mask
    visual_input: Optional[int] = None          # input whose carried mask the graph takes as an extra input

    @property
    def needed(self) -> bool:
        return bool(self.keys_outputs or self.past_key_inputs or self.extra_outputs
                    or self.handoff_output is not None or self.visual_input is not None)


class Runtime:
    """Per-backend state and the wrapper factory; one instance per ``EraBackend``."""

    def __init__(self, report: Report, strict: bool):
        self.store = CacheBiasStore()
        self.handoffs = WeakIdKeyDictionary()  # merged embeddings -> Handoff
        self.report = report
        self.strict = strict
        self._warned = False

    def wrap(self, compiled: Callable, plan: GraphPlan) -> Callable:
        if not plan.needed:
            return compiled

        def run(*args):
            if plan.visual_input is not None:
                handoff = self.handoffs[args[plan.visual_input]]  # ``dispatch`` chose this variant for it
                handoff.claimed = True
                args = args + (handoff.mask,)
            biases = self._past_biases(args, plan)
            with cache_biases(biases):
                outputs = compiled(*args)
            return self._record(list(outputs), plan, biases)

        run._era_plan = plan  # for tests and debugging
        return run

    def dispatch(self, receivers: List[int], build: Callable[[List, Optional[Tuple[int, Handoff]]], Callable],
                 example_inputs: List) -> Callable:
        """A graph that may receive merged embeddings (``receivers``: its rank-3 float inputs):
        one compiled variant per (input, T) carried, built by ``build(args, carried)`` on first sight."""
        variants: Dict[Optional[Tuple[int, int]], Callable] = {}

        def variant(args) -> Callable:
            carried = self._carried(args, receivers)
            key = (carried[0], carried[1].num_visual) if carried else None
            if key not in variants:
                variants[key] = build(list(args), carried)
            return variants[key]

        variant(example_inputs)

        def run(*args):
            return variant(args)(*args)

        run._era_variants = variants  # for tests and debugging
        return run

    def _carried(self, args, receivers: List[int]) -> Optional[Tuple[int, Handoff]]:
        found = [(i, self.handoffs.get(args[i])) for i in receivers]
        found = [(i, h) for i, h in found if h is not None]
        if len(found) > 1:
            raise RuntimeError(f"era_compile: inputs {[i for i, _ in found]} of one graph all carry merged "
                               "image embeddings; expected one")
        return found[0] if found else None

    def _hand_off(self, embeds: Tensor, handoff: Handoff) -> None:
        self.handoffs[embeds] = handoff
        weakref.finalize(embeds, self._check_claimed, handoff)

    def _check_claimed(self, handoff: Handoff) -> None:
        if handoff.claimed:
            return
        why = (f"graph {handoff.graph} merged {handoff.num_visual} visual tokens per sample and handed them on, "
               "but no compiled graph received the merged embeddings (changed outside a graph?): "
               "pruning did not happen")
        self.report.skipped.append(why)
        warnings.warn(f"era_compile: {why}", RuntimeWarning)
        logger.warning(why)

    # ------------------------------------------------------------------ before a call

    def _past_biases(self, args, plan: GraphPlan) -> Dict[int, Tensor]:
        biases = {}
        for layer, i in plan.past_key_inputs.items():
            past = args[i]
            bias = self.store.lookup(past)
            if bias is None:
                self._broken(layer, past)
                bias = torch.zeros(past.shape[0], past.shape[-2], device=past.device)
            biases[layer] = bias
        return biases

    def _broken(self, layer: int, past: Tensor) -> None:
        why = (f"layer {layer}: the cached keys passed to this decode step were not written by a graph of this "
               "backend (a cache reordered or copied outside the graph, e.g. beam search, or prefilled "
               "without it); the recycled anchors' bias is unknown")
        if self.strict:
            raise BrokenBiasChain(why)
        if not self._warned:
            self._warned = True
            warnings.warn(f"era_compile: {why}; attending without it", RuntimeWarning, stacklevel=4)
            logger.warning("%s; attending without it", why)
        self.report.broken_bias_chain += 1

    # ------------------------------------------------------------------ after a call

    def _record(self, outputs: List, plan: GraphPlan, past: Dict[int, Tensor]):
        if plan.handoff_output is not None:
            self._hand_off(outputs[plan.handoff_output], Handoff(outputs.pop(), plan.num_visual, plan.graph))
        elif plan.extra_outputs:
            keep_index, log_bias, *rest = outputs[-plan.extra_outputs:]
            del outputs[-plan.extra_outputs:]
            key_visible = rest[0] if rest else None
            self._record_prefill(outputs, plan, keep_index, log_bias, key_visible)
        else:
            for layer, i in plan.keys_outputs.items():
                keys = outputs[i]
                old = past.get(layer)
                old_len = old.shape[-1] if old is not None else 0
                new = torch.zeros(keys.shape[0], keys.shape[-2] - old_len, device=keys.device)
                self.store.record(keys, new if old is None else torch.cat([old.to(new.device), new], -1))
        return tuple(outputs)

    def _record_prefill(self, outputs: List, plan: GraphPlan, keep_index: Tensor, log_bias: Tensor,
                        key_visible: Optional[Tensor]) -> None:
        bias = log_bias if plan.rectify else torch.zeros_like(log_bias)
        aligned = key_visible is not None and (plan.align_with_mask or not bool(key_visible.all()))
        if aligned:
            seq_len = key_visible.shape[-1]  # N: the visibility row spans the original positions
            bias = torch.full((bias.shape[0], seq_len), BLOCKED, device=bias.device).scatter(1, keep_index, bias)
        for layer, i in plan.keys_outputs.items():
            if aligned:
                j = plan.values_outputs[layer]
                outputs[i] = _at_original_positions(outputs[i], keep_index, seq_len)
                outputs[j] = _at_original_positions(outputs[j], keep_index, seq_len)
            self.store.record(outputs[i], bias)


def _at_original_positions(cache: Tensor, keep_index: Tensor, seq_len: int) -> Tensor:
    """[B, H, n', d] kept rows -> [B, H, N, d] with each row at its original position, zeros elsewhere."""
    B, H, _, d = cache.shape
    index = keep_index[:, None, :, None].expand(B, H, keep_index.shape[1], d)
    return cache.new_zeros(B, H, seq_len, d).scatter(2, index, cache)


def plan_for(ctx, config, gm) -> GraphPlan:
    """The runtime plan of a graph, from what the passes found in it."""
    plan = GraphPlan(rectify=config.rectify, extra_outputs=ctx.extra_outputs, align_with_mask=config.layer >= 1,
                     graph=ctx.graph_index, handoff_output=ctx.handoff_output,
                     num_visual=ctx.span.num_visual if ctx.span is not None else 0,
                     visual_input=ctx.carried.input_index if ctx.carried is not None else None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for c in ctx.cache_layers:
        if c.index < config.layer:
            continue
        plan.keys_outputs[c.index] = c.keys_output
        plan.values_outputs[c.index] = c.values_output
        if c.past_keys is not None:
            plan.past_key_inputs[c.index] = placeholders.index(c.past_keys)
    return plan

