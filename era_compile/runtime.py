"""What runs around a compiled graph: what one graph decided reaches the next by tensor identity.

Two things travel that way, each in a per-backend store keyed weakly by a tensor's identity,
so an entry dies with its tensor and two requests or two models never share one:

* the visual mask, from a graph that merged image features but runs no decoder to the graph
  that receives the merged embeddings (a plain Qwen2-VL forward, see ``passes/handoff.py``);
* the LAR bias of the pruned cache, from a prefill to every decode step.

Visual mask. A graph that receives merged embeddings is compiled per visual-token count T
(its pruned shapes depend on T): ``CarriedVariants`` looks its inputs up and runs, or compiles
on first sight, the variant for the T they carry; no carried mask means the unpruned variant.
A handed-on mask that no graph picks up is reported when its tensor dies: pruning did not happen.

The cache of layers >= K keeps plain, d-wide keys (widening them would break the next
decode trace, DESIGN.md section 4). Their bias lives beside them, in a ``CacheBiasStore``
keyed by the *identity* of the cached key tensors: a compiled graph's new cache tensors come
back, as the very same objects, as inputs of the next decode graph. An entry dies with its
cache, and two requests or two models never share a key tensor, so they never share a bias.

* After a pruned prefill: each cached key tensor of layers >= K gets its bias (``log b``
  on anchors, 0 on text; ``-inf`` where the position holds no token, see below).
* Before a decode step: each rectified layer's past keys are looked up, and the bias is
  passed to the graph as an input (``passes/records.PastBiasInput``): every ``era::`` op's
  output is a function of its inputs. After it, the new cache tensors get the old bias
  extended by 0 for the new tokens.
* A past-key tensor the store does not know (a cache reordered or copied outside the graph,
  as beam search does) breaks the chain: ``strict`` raises; otherwise a warning, a report
  line and bias 0 for that step. Never a silent zero.
* Fail closed: a graph that receives cached keys whose recorded bias is not all zero, but
  whose attention over them was not rewritten (its rewrite failed, an unrecognised spelling),
  raises in strict mode (``UnrectifiedCache``) and otherwise warns and reports.

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from era_compile.passes.fx_utils import is_weight, placeholders
from era_compile.passes.kinds import GraphKind
from era_compile.passes.records import (AddedInput, CarriedVisual, Handoff, HandoffOutputs, KVCache, PastBiasInput,
                                        PrefillOutputs, VisualMaskInput)
from era_compile.report import Report, logger

BLOCKED = torch.finfo(torch.float32).min  # bias of a cache position that holds no token


class BrokenBiasChain(RuntimeError):
    """A decode step received cached keys whose bias this backend never recorded."""


class UnrectifiedCache(RuntimeError):
    """A compiled graph attends over cached anchors without their bias (its attention was not rewritten)."""


@dataclass(eq=False)
class HandedOnMask:
    """A merged-embeddings tensor's visual mask, waiting for the graph that runs the decoder."""

    mask: Tensor            # bool [B, N]
    num_visual: int         # T per sample, static in the graph that merged
    graph: int              # that graph's index, for messages
    claimed: bool = False


@dataclass(frozen=True)
class CachedBias:
    bias: Tensor            # float32 [B, L], one entry per cached key
    nonzero: bool           # any anchor bias or blocked slot: attending without it changes the output


class CacheBiasStore:
    """``cached key tensor -> CachedBias`` by identity; entries die with their tensors."""

    def __init__(self):
        self._bias = WeakIdKeyDictionary()

    def record(self, keys: Tensor, bias: Tensor, nonzero: Optional[bool] = None) -> None:
        self._bias[keys] = CachedBias(bias, bool(bias.any()) if nonzero is None else nonzero)

    def lookup(self, keys: Tensor) -> Optional[CachedBias]:
        return self._bias.get(keys)


@dataclass
class GraphPlan:
    """What the runtime does around one compiled graph (from the passes' records)."""

    graph: int = 0
    kind: GraphKind = GraphKind.TEXT
    keys_outputs: Dict[int, int] = field(default_factory=dict)    # layer -> output index
    values_outputs: Dict[int, int] = field(default_factory=dict)
    added_inputs: Tuple[AddedInput, ...] = ()   # supplied on every call, in order
    prefill_outputs: int = 0                    # trailing ``PrefillOutputs`` fields
    handoff: Optional[Handoff] = None           # merged embeddings handed on, their mask trailing
    watched_inputs: Tuple[int, ...] = ()        # possible cached keys the graph does not rectify
    rectify: bool = True
    align_with_mask: bool = False               # K >= 1: any attention mask means aligned caches

    @property
    def needed(self) -> bool:
        return bool(self.keys_outputs or self.added_inputs or self.prefill_outputs or self.handoff
                    or self.watched_inputs)


def plan_for(kind: GraphKind, records: Dict[type, Any], config, gm, example_inputs: Sequence[Any],
             added_inputs: Sequence[AddedInput], graph: int) -> GraphPlan:
    """The runtime plan of a graph, from what its passes recorded (no records: a fallback)."""
    plan = GraphPlan(graph=graph, kind=kind, rectify=config.rectify, align_with_mask=config.layer >= 1,
                     added_inputs=tuple(added_inputs))
    if kind is GraphKind.HANDOFF:
        plan.handoff = records.get(Handoff)
    elif kind.has_image and PrefillOutputs in records:
        plan.prefill_outputs = len(records[PrefillOutputs].values())
    inputs = placeholders(gm)
    cache = records.get(KVCache)
    for c in cache.layers if cache is not None else ():
        if c.index >= config.layer:
            plan.keys_outputs[c.index] = c.keys_output
            plan.values_outputs[c.index] = c.values_output
    read = {a.past_keys_input for a in added_inputs if isinstance(a, PastBiasInput)}
    examples = list(example_inputs)[:len(inputs)]
    plan.watched_inputs = tuple(i for i, (node, x) in enumerate(zip(inputs, examples))
                                if i not in read and isinstance(x, Tensor) and x.dim() == 4
                                and x.is_floating_point() and not is_weight(node, x))
    return plan


class Runtime:
    """Per-backend state; one instance per ``EraBackend``."""

    def __init__(self, report: Report, strict: bool):
        self.store = CacheBiasStore()
        self.handoffs = WeakIdKeyDictionary()  # merged embeddings -> HandedOnMask
        self.report = report
        self.strict = strict
        self._warned: set = set()

    def wrap(self, compiled: Callable, plan: GraphPlan) -> Callable:
        return RuntimeWrapper(self, compiled, plan) if plan.needed else compiled

    # ------------------------------------------------------------------ before a call

    def supply(self, added: AddedInput, args: tuple, past: Dict[int, CachedBias]) -> Tensor:
        """The value of an input a pass appended, for this call."""
        if isinstance(added, VisualMaskInput):
            handoff = self.handoffs[args[added.source_input]]  # ``CarriedVariants`` chose this variant for it
            handoff.claimed = True
            return handoff.mask
        if isinstance(added, PastBiasInput):
            keys = args[added.past_keys_input]
            entry = self.store.lookup(keys)
            if entry is None:
                self._broken(added.layer)
                entry = CachedBias(torch.zeros(keys.shape[0], keys.shape[-2], device=keys.device), False)
            past[added.layer] = entry
            return entry.bias.to(keys.device)
        raise TypeError(f"era_compile runtime: no value for added input {added!r}")

    def check_watched(self, args: tuple, plan: GraphPlan) -> None:
        """Cached anchors reaching a graph that does not add their bias: never silently."""
        for i in plan.watched_inputs:
            entry = self.store.lookup(args[i])
            if entry is None or not entry.nonzero:
                continue
            why = (f"graph {plan.graph} ({plan.kind.value}) receives cached keys (input {i}) whose recycled "
                   "anchors carry a LAR bias, but its attention over them was not rewritten (its rewrite "
                   "failed or was not recognised): this step attends without the bias")
            if self.strict:
                raise UnrectifiedCache(why)
            self._warn_once(("unrectified", plan.graph), why)
            self.report.unrectified_cache += 1
            return

    def _broken(self, layer: int) -> None:
        why = (f"layer {layer}: the cached keys passed to this decode step were not written by a graph of this "
               "backend (a cache reordered or copied outside the graph, e.g. beam search, or prefilled "
               "without it); the recycled anchors' bias is unknown")
        if self.strict:
            raise BrokenBiasChain(why)
        self._warn_once("broken", f"{why}; attending without it")
        self.report.broken_bias_chain += 1

    def _warn_once(self, key, why: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(f"era_compile: {why}", RuntimeWarning, stacklevel=5)
        logger.warning("%s", why)

    # ------------------------------------------------------------------ after a call

    def record(self, outputs: List, plan: GraphPlan, past: Dict[int, CachedBias]) -> tuple:
        if plan.handoff is not None:
            handed = HandoffOutputs.take(outputs, len(plan.handoff.outputs.values()))
            self._hand_off(outputs[plan.handoff.embeddings_output],
                           HandedOnMask(handed.visual_mask, plan.handoff.num_visual, plan.graph))
        elif plan.prefill_outputs:
            self._record_prefill(outputs, plan, PrefillOutputs.take(outputs, plan.prefill_outputs))
        else:
            for layer, i in plan.keys_outputs.items():
                keys = outputs[i]
                old = past.get(layer)
                if old is None:  # a fresh cache (a text-only prefill): its keys carry no bias
                    zeros = torch.zeros(keys.shape[0], keys.shape[-2], device=keys.device)
                    self.store.record(keys, zeros, nonzero=False)
                    continue
                new = torch.zeros(keys.shape[0], keys.shape[-2] - old.bias.shape[-1], device=keys.device)
                self.store.record(keys, torch.cat([old.bias.to(new.device), new], -1), nonzero=old.nonzero)
        return tuple(outputs)

    def _record_prefill(self, outputs: List, plan: GraphPlan, published: PrefillOutputs) -> None:
        keep_index, key_visible = published.keep_index, published.key_visible
        bias = published.log_bias if plan.rectify else torch.zeros_like(published.log_bias)
        aligned = key_visible is not None and (plan.align_with_mask or not bool(key_visible.all()))
        if aligned:
            seq_len = key_visible.shape[-1]  # N: the visibility row spans the original positions
            bias = torch.full((bias.shape[0], seq_len), BLOCKED, device=bias.device).scatter(1, keep_index, bias)
        nonzero = bool(bias.any())
        for layer, i in plan.keys_outputs.items():
            if aligned:
                j = plan.values_outputs[layer]
                outputs[i] = _at_original_positions(outputs[i], keep_index, seq_len)
                outputs[j] = _at_original_positions(outputs[j], keep_index, seq_len)
            self.store.record(outputs[i], bias, nonzero)

    def _hand_off(self, embeds: Tensor, handoff: HandedOnMask) -> None:
        self.handoffs[embeds] = handoff
        weakref.finalize(embeds, self._check_claimed, handoff)

    def _check_claimed(self, handoff: HandedOnMask) -> None:
        if handoff.claimed:
            return
        why = (f"graph {handoff.graph} merged {handoff.num_visual} visual tokens per sample and handed them on, "
               "but no compiled graph received the merged embeddings (changed outside a graph?): "
               "pruning did not happen")
        self.report.skipped.append(why)
        warnings.warn(f"era_compile: {why}", RuntimeWarning)
        logger.warning(why)

    def carried(self, args: Sequence[Any], receivers: Sequence[int]) -> Optional[Tuple[int, HandedOnMask]]:
        """The one input of ``args`` that carries a handed-on visual mask, if any."""
        found = [(i, self.handoffs.get(args[i])) for i in receivers]
        found = [(i, h) for i, h in found if h is not None]
        if len(found) > 1:
            raise RuntimeError(f"era_compile: inputs {[i for i, _ in found]} of one graph all carry merged "
                               "image embeddings; expected one")
        return found[0] if found else None


class RuntimeWrapper:
    """A compiled graph with the runtime around it: supply the added inputs, check the cached
    keys it does not rectify, strip and record what it publishes."""

    def __init__(self, runtime: Runtime, compiled: Callable, plan: GraphPlan):
        self.runtime, self.compiled, self.plan = runtime, compiled, plan

    def __call__(self, *args):
        past: Dict[int, CachedBias] = {}
        extra = [self.runtime.supply(a, args, past) for a in self.plan.added_inputs]
        if self.plan.watched_inputs:
            self.runtime.check_watched(args, self.plan)
        outputs = self.compiled(*args, *extra)
        return self.runtime.record(list(outputs), self.plan, past)


class CarriedVariants:
    """A graph that merged embeddings from an earlier graph may reach: one compiled variant per
    (input, T) it receives, built by ``build(args, carried)`` on first sight; a call that carries
    no mask runs the plain variant. ``variants`` maps (input, T) or None to the compiled callable."""

    def __init__(self, runtime: Runtime, graph: int, receivers: Sequence[int],
                 build: Callable[[List[Any], Optional[CarriedVisual]], Callable], example_inputs: Sequence[Any]):
        self.runtime, self.graph, self.receivers, self.build = runtime, graph, tuple(receivers), build
        self.variants: Dict[Optional[Tuple[int, int]], Callable] = {}
        self.variant_for(example_inputs)

    def variant_for(self, args: Sequence[Any]) -> Callable:
        found = self.runtime.carried(args, self.receivers)
        key = (found[0], found[1].num_visual) if found else None
        if key not in self.variants:
            carried = CarriedVisual(found[0], found[1].mask, found[1].num_visual) if found else None
            self.variants[key] = self.build(list(args), carried)
            self.runtime.report.variants.setdefault(self.graph, []).append(key[1] if key else None)
        return self.variants[key]

    def __call__(self, *args):
        return self.variant_for(args)(*args)


def _at_original_positions(cache: Tensor, keep_index: Tensor, seq_len: int) -> Tensor:
    """[B, H, n', d] kept rows -> [B, H, N, d] with each row at its original position, zeros elsewhere."""
    B, H, _, d = cache.shape
    index = keep_index[:, None, :, None].expand(B, H, keep_index.shape[1], d)
    return cache.new_zeros(B, H, seq_len, d).scatter(2, index, cache)
