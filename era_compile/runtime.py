"""What runs around a compiled graph: what one graph decided reaches the next.

* The visual mask, from a graph that merged image features but runs no decoder to the graph
  that receives the merged embeddings (a plain Qwen2-VL forward, see ``passes/handoff.py``):
  kept in a per-backend store keyed weakly by the embeddings tensor's identity, so an entry
  dies with its tensor and two requests or two models never share one. A graph that may receive
  merged embeddings is compiled once per input that carries them (``Variants``; no carried mask:
  the unpruned variant), whatever the image size. A handed-on mask that no graph picks up is
  reported when its tensor dies: pruning did not happen.
* What each call pruned. The number of visual tokens, the budget and the pruned length are data
  of the call (the pruning ops count them), so one compiled prefill serves every image size and
  every ragged batch; the prefill returns each sample's ``T_b`` and ``k_b``, which the runtime
  puts in the report (one entry per layout seen, and a count of pruned calls).
* The pruned layers' KV cache. A pruned prefill returns, for layers >= K, the keys and values
  of the kept tokens; the runtime hands them back as ``CompactKV`` tensors
  (``era_compile.compact_kv``): as long as Hugging Face expects (the original positions, so its
  one decode mask, sized from layer 0, fits every layer), storing only the kept rows, with each
  row's original position and LAR bias inside. Every later decode step appends to them and
  attends over them through their own attention: the bias travels with the cache, in every
  step, through beam search's reordering, and two requests or two models can never share it.
  Layers < K keep their full, plain cache.
* Whether an image was pruned at all. A graph that encodes images (``kinds.image_values``) and
  does not prune them leaves a ``PendingImage``; a pruned prefill resolves it (a handoff only
  names the graph that should). A graph that then runs the language model without pruning is
  the proof that the prompt went on unpruned (its visual tokens already passed the layers): one
  whose text embeddings reach decoder layers (``kinds.runs_decoder_layers``), or one whose hidden
  states of the prompt's [B, N] reach them (a decoder split into per-layer graphs; after a
  handoff, other embeddings than the merged ones). A warning and a report line as that graph
  returns (strict: an ``EraCompileError``). One that no decoder ran on belonged to a request that
  failed before its prefill: dropped at the next decode step or when the inputs and outputs of
  the calls that encoded it die. Text-only prompts skip the vision tower, so they leave nothing
  pending.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from era_compile.compact_kv import compact, without_base
from era_compile.ops.prune import without_lar
from era_compile.passes.kinds import GraphKind
from era_compile.passes.records import (
    AddedInput,
    BudgetInput,
    CarriedVisual,
    Handoff,
    HandoffOutputs,
    KVCache,
    LayerStep,
    PrefillOutputs,
    PruneSite,
    SaliencyOutputs,
    VisualMaskInput,
    WalkInput,
)
from era_compile.report import Report, set_last

log = logging.getLogger(__name__)


class EraCompileError(RuntimeError):
    """Raised in strict mode when the backend could not prune a graph it should have."""


@dataclass(eq=False)
class HandedOnMask:
    """A merged-embeddings tensor's visual mask, waiting for the graph that runs the decoder."""

    mask: Tensor  # bool [B, N]
    graph: int  # that graph's index, for messages
    claimed: bool = False


@dataclass(eq=False)
class PendingImage:
    """An image some graphs encoded and no graph has pruned yet."""

    graphs: list[int]  # the graphs that encoded it, in call order
    anchors: int = 0  # living inputs and outputs of those calls: at 0 the request is over
    resolved: bool = False  # pruned, reported, or dropped
    handoff: HandedOnMask | None = None  # its merge, handed on to the graph that should prune it
    walked: LayerWalk | None = None  # a split decoder's walk over its layers that ended unpruned


@dataclass(eq=False)
class LayerWalk:
    """An image prompt on its way through a decoder that Dynamo split into per-layer graphs
    (``passes/saliency.py``). Layer 0's graph receives the merged embeddings the merge handed on;
    each later call of a layer's own graph on hidden states of the prompt's [B, N] is the next
    layer. The walk carries what one layer hands the next: layer K - 1's queries and keys, then
    layer K's kept positions, their bias (for the caches) and its key bias [B, N], by which every
    later layer's graph cuts its sequence where layer K did. It ends with the forward (the merged
    embeddings die), at the next prompt's embedding or image, or at a decode step."""

    visual_mask: Tensor  # bool [B, N], from the merge's handoff
    merge_graph: int
    prune_layer: int  # K
    layer: int = 0  # the layer whose graph was called last
    last_input: Callable[[], Tensor | None] = lambda: None  # weakref to that call's hidden states
    queries: Tensor | None = None  # layer K - 1's, for layer K's selection
    keys: Tensor | None = None
    keep_index: Tensor | None = None  # after layer K: the kept positions [B, n']
    log_bias: Tensor | None = None  # their bias [B, n'] (0 without LAR), for the caches
    key_bias: Tensor | None = None  # float32 [B, N]: what the later layers keep (``era::kept_tokens``)
    over: bool = False

    @property
    def pruned(self) -> bool:
        return self.key_bias is not None


@dataclass
class GraphPlan:
    """What the runtime does around one compiled graph (from the passes' records)."""

    graph: int = 0
    kind: GraphKind = GraphKind.TEXT
    layer: int | None = None  # where a pruned prefill prunes
    data_dependent: dict[int, tuple[int, ...]] = field(default_factory=dict)  # output -> dims of length n'
    keys_outputs: dict[int, int] = field(default_factory=dict)  # pruned layer -> output index
    values_outputs: dict[int, int] = field(default_factory=dict)
    windows: dict[int, int] = field(default_factory=dict)  # sliding-window layer -> window start
    added_inputs: tuple[AddedInput, ...] = ()  # supplied on every call, in order
    prefill_outputs: int = 0  # trailing ``PrefillOutputs`` fields
    handoff: Handoff | None = None  # merged embeddings handed on, their mask trailing
    rectify: bool = True
    image_inputs: tuple[int, ...] = ()  # the inputs an image enters by (``kinds.image_inputs``)
    decode_step: bool = False  # attends over a past KV cache: the prompt is done
    runs_decoder: bool = False  # ``kinds.runs_decoder_layers``: a language model runs here
    hidden_inputs: tuple[int, ...] = ()  # ``kinds.hidden_inputs_into_layers``: [B, N, D] into layers
    token_inputs: tuple[int, ...] = ()  # ``kinds.token_id_inputs``: the prompt's [B, N] token ids
    layer_forward: bool = False  # ``kinds.is_layer_forward``: one decoder layer's own graph
    split_layer: bool = False  # a split decoder's layer >= K: it runs on the kept tokens the walk holds
    saliency_outputs: int = 0  # trailing ``SaliencyOutputs`` fields (layer K - 1 of a split decoder)
    fell_back: bool = False  # runs unpruned, as reported when it fell back: the image is told

    @property
    def encodes_images(self) -> bool:
        return bool(self.image_inputs)

    @property
    def watches_images(self) -> bool:
        """Whether a call can find an image that no graph pruned."""
        return self.encodes_images or self.decode_step

    @property
    def needed(self) -> bool:
        return (
            bool(
                self.added_inputs
                or self.prefill_outputs
                or self.handoff
                or self.hidden_inputs
                or self.token_inputs
                or self.keys_outputs
                or self.saliency_outputs
            )
            or self.watches_images
            or self.runs_decoder
            or self.fell_back
        )


@dataclass(frozen=True)
class Watched:
    """What the runtime watches of a graph for an unpruned image, read off it once (``passes.kinds``)
    whatever variants it is compiled in."""

    image_inputs: tuple[int, ...] = ()  # ``image_inputs``: an image enters by these
    runs_decoder: bool = False  # ``runs_decoder_layers``: the text's embeddings reach a layer
    hidden_inputs: tuple[int, ...] = ()  # ``hidden_inputs_into_layers``: [B, N, ...] into layers
    token_inputs: tuple[int, ...] = ()  # ``token_id_inputs``: the prompt's [B, N] token ids
    layer_forward: bool = False  # ``is_layer_forward``: a decoder layer's own graph


def plan_for(
    kind: GraphKind,
    records: dict[type, Any],
    config,
    graph: int,
    added_inputs: Sequence[AddedInput] = (),
    data_dependent: dict[int, tuple[int, ...]] | None = None,
    watched: Watched = Watched(),
) -> GraphPlan:
    """The runtime plan of a graph, from what its passes recorded (no records: a fallback);
    ``data_dependent``: the outputs' dimensions of the pruned length (``fx_utils.data_dependent_dims``).
    Only a text-kind variant can run the decoder on an unpruned image: the others prune it."""
    text = kind is GraphKind.TEXT
    plan = GraphPlan(
        graph=graph,
        kind=kind,
        rectify=config.rectify,
        added_inputs=tuple(added_inputs),
        data_dependent=dict(data_dependent or {}),
        image_inputs=watched.image_inputs,
        runs_decoder=text and watched.runs_decoder,
        hidden_inputs=watched.hidden_inputs if text else (),
        token_inputs=watched.token_inputs,
        layer_forward=watched.layer_forward,
    )
    cache = records.get(KVCache)
    # a decode step reads a past cache; a vision tower split at its attention looks like decode but writes none
    plan.decode_step = (
        kind is GraphKind.DECODE
        and cache is not None
        and (any(c.past_keys is not None for c in cache.layers) or bool(cache.written_in_place))
    )
    plan.split_layer = kind in (GraphKind.LAYER_PRUNE, GraphKind.LAYER_KEPT)
    if kind is GraphKind.HANDOFF:
        plan.handoff = records.get(Handoff)
    elif kind is GraphKind.LAYER_SALIENCY:
        plan.saliency_outputs = len(records[SaliencyOutputs].values())
    elif (kind.has_image and PrefillOutputs in records) or kind is GraphKind.LAYER_KEPT:
        if PrefillOutputs in records:
            plan.prefill_outputs = len(records[PrefillOutputs].values())
            plan.layer = records[PruneSite].layer
        for c in records[KVCache].layers:
            if c.index >= config.layer:
                plan.keys_outputs[c.index] = c.keys_output
                plan.values_outputs[c.index] = c.values_output
                if c.window_start is not None:
                    plan.windows[c.index] = c.window_start
    return plan


class Runtime:
    """One compiled model's state (``backend.CompiledModel``): two models never share one."""

    def __init__(self, report: Report, budget: Callable[[], Tensor], strict: bool = False):
        self.handoffs = WeakIdKeyDictionary()  # merged embeddings -> HandedOnMask
        self.report = report
        self.budget = budget  # what every pruned prefill keeps now (``EraBackend.budget`` changes it)
        self.strict = strict
        self.pending: PendingImage | None = None  # an image encoded since the last pruned prefill
        self.prompt_shape: tuple[int, ...] | None = None  # [B, N] of the token ids last embedded
        self.walk: LayerWalk | None = None  # an image prompt in a decoder split per layer

    def wrap(self, compiled: Callable, plan: GraphPlan) -> Callable:
        return RuntimeWrapper(self, compiled, plan) if plan.needed else compiled

    def supply(self, added: AddedInput, args: tuple) -> Tensor:
        """The value of an input a pass appended, for this call."""
        if isinstance(added, VisualMaskInput):
            handoff = self.handoffs[args[added.source_input]]  # ``Variants`` chose this variant for it
            handoff.claimed = True
            return handoff.mask
        if isinstance(added, BudgetInput):
            return self.budget()
        if isinstance(added, WalkInput):
            value = getattr(self.walk, added.field) if self.walk is not None else None
            if value is None:
                raise RuntimeError(f"era_compile runtime: no {added.field} on this prompt's way through its layers")
            return value
        raise TypeError(f"era_compile runtime: no value for added input {added!r}")

    def record(self, outputs: list, plan: GraphPlan, args: tuple = ()) -> tuple:
        """Strip what a graph published after its outputs and act on it (``args``: the call's inputs)."""
        if plan.token_inputs:
            self.prompt_shape = tuple(args[plan.token_inputs[0]].shape)
        if self.walk is not None and (plan.token_inputs or plan.encodes_images or plan.decode_step):
            self._end_walk(self.walk)  # a new prompt, or the decode after this one's prefill
        if plan.saliency_outputs:
            handed = SaliencyOutputs.take(outputs, plan.saliency_outputs)
            walk = self.walk
            assert walk is not None  # ``layer_step`` gives the saliency variant to a walk's layer K - 1 only
            # contiguous, as the placeholders layer K's graph was compiled with (Inductor checks strides)
            walk.queries, walk.keys = handed.queries.contiguous(), handed.keys.contiguous()
        elif plan.split_layer and not plan.prefill_outputs:  # a split decoder's layer after K
            walk = self.walk
            # ``layer_step`` gives the kept variant to a pruned walk's layers only
            assert walk is not None and walk.keep_index is not None and walk.log_bias is not None
            assert walk.key_bias is not None
            self._compact_caches(outputs, plan, walk.keep_index, walk.log_bias, walk.key_bias.shape[-1])
        elif plan.handoff is not None:
            handed = HandoffOutputs.take(outputs, len(plan.handoff.outputs.values()))
            handoff = HandedOnMask(handed.visual_mask, plan.graph)
            self._hand_off(outputs[plan.handoff.embeddings_output], handoff)
            self._image_handed_on(handoff)
        elif plan.prefill_outputs:
            published = PrefillOutputs.take(outputs, plan.prefill_outputs)
            bias = published.log_bias if plan.rectify else without_lar(published.log_bias)
            length = published.key_visible.shape[-1]  # N: the visibility row spans the original positions
            self._compact_caches(outputs, plan, published.keep_index, bias, length)
            if plan.split_layer:  # layer K of a split decoder: the later layers keep what it kept
                self._pruned_on_the_walk(published, bias)
            else:
                self._mark_pruned_lengths(outputs, plan)
            assert plan.layer is not None  # ``plan_for`` sets it with ``prefill_outputs``
            self.report.record_prefill(
                plan.graph,
                plan.layer,
                published.samples.tolist(),
                published.key_visible.shape[-1],
                published.keep_index.shape[-1],
            )
            set_last(self.report)
            self.resolve_pending_image()
        elif plan.fell_back:
            self.resolve_pending_image()
        else:
            if plan.encodes_images:
                self._image_encoded(
                    plan.graph, [args[i] for i in plan.image_inputs] + [x for x in outputs if isinstance(x, Tensor)]
                )
            walking = plan.layer_forward and self.walk is not None
            pending = self.pending
            if (
                pending is not None
                and not walking
                and (plan.runs_decoder or self._runs_on_the_prompt(pending, plan, args))
            ):
                self._not_pruned(pending, plan)
        return tuple(outputs)

    # ------------------------------------------------------------------ images left unpruned
    # Recorded after a call returned (a call that raised leaves nothing pending); checked before one.

    def before_call(self, plan: GraphPlan) -> None:
        """Before a call: an image no decoder ran on is dropped by a decode step (its request failed
        before its prefill); the next image's encoding adds to it (Qwen's tower spans graphs)."""
        if plan.watches_images and self.pending is not None and plan.decode_step:
            self._drop(self.pending)

    def recompile_limit_hit(self, function: str, alone: bool = True) -> None:
        """Dynamo gave up recompiling ``function``, one of this model's (``era_compile.recompiles``);
        ``alone``: no other live model traced it (else strict mode warns: the call may be another's)."""
        limit = torch._dynamo.config.recompile_limit
        self.tell(
            f"Dynamo hit its recompile limit ({limit}) for {function}: it compiles that function no more, "
            "so a prompt that needs a new graph there runs eagerly, unpruned. Give Dynamo headroom while "
            "serving (`with era_compile.recompile_headroom(): ...`, or torch.compile(..., recompile_limit=64) "
            "on torch >= 2.13); TORCH_LOGS=recompiles says what recompiles",
            note=True,
            may_raise=alone,
        )

    def tell(self, why: str, note: bool = False, may_raise: bool = True) -> None:
        """A verdict the user must hear, once: a ``RuntimeWarning`` (strict: an ``EraCompileError``,
        where ``may_raise``), and a line of the report (``unpruned_images``, or ``notes``)."""
        (self.report.notes if note else self.report.unpruned_images).append(why)
        if self.strict and may_raise:
            raise EraCompileError(f"era_compile: {why}")
        warnings.warn(f"era_compile: {why}", RuntimeWarning, stacklevel=3)

    def _image_encoded(self, graph: int, anchors: list[Tensor]) -> None:
        pending = self.pending
        if pending is None:
            pending = self.pending = PendingImage([])
        pending.graphs.append(graph)
        # While its request runs, some of what the calls that encoded it took or made is alive: the
        # caller's pixel values, or the features the model keeps; a copy of the pixels made outside
        # the graphs (Granite 4 Vision's crops) dies early, and so may the features before the
        # prefill runs; a view's base is the caller's tensor. The image is over when all of them are.
        for x in anchors:
            pending.anchors += 1
            weakref.finalize(x if x._base is None else x._base, self._anchor_died, pending)

    def _runs_on_the_prompt(self, pending: PendingImage, plan: GraphPlan, args: tuple) -> bool:
        """Decoder layers ran on hidden states of the waiting image's sequence ([B, N] of its merge,
        or of the prompt last embedded), computed by an earlier graph: the image went on unpruned."""
        handoff = pending.handoff
        shape = tuple(handoff.mask.shape) if handoff is not None and not handoff.claimed else self.prompt_shape
        return shape is not None and any(
            isinstance(args[i], Tensor) and tuple(args[i].shape[:2]) == shape for i in plan.hidden_inputs
        )

    def _image_handed_on(self, handoff: HandedOnMask) -> None:
        """Merged, not yet pruned: the graph that receives the merged embeddings prunes it (or falls
        back, loudly); a decoder that runs on other embeddings first is the proof it did not."""
        if self.pending is None:
            self.pending = PendingImage([])
        self.pending.graphs.append(handoff.graph)
        self.pending.handoff = handoff

    def resolve_pending_image(self) -> None:
        """The pending image was pruned, or an error or warning of a fallback told of it."""
        if self.pending is not None:
            self._forget(self.pending)

    def _anchor_died(self, pending: PendingImage) -> None:
        pending.anchors -= 1
        if pending.anchors == 0 and not pending.resolved:
            self._drop(pending)

    def _drop(self, pending: PendingImage) -> None:
        """An image no decoder ran on: its request failed (or ended) before its prefill."""
        self._forget(pending)
        log.debug("graph(s) %s encoded an image that no decoder ran on: dropped", pending.graphs)

    def _forget(self, pending: PendingImage) -> None:
        pending.resolved = True
        if self.pending is pending:
            self.pending = None

    def _not_pruned(self, pending: PendingImage, plan: GraphPlan) -> None:
        self._forget(pending)
        graphs = ", ".join(str(g) for g in dict.fromkeys(pending.graphs))
        decoder = plan.graph
        handed_on = pending.handoff if pending.handoff is not None and not pending.handoff.claimed else None
        if handed_on is not None:
            handed_on.claimed = True  # told here: its tensor's death need not tell it again
        if plan.layer_forward and handed_on is None:  # a split decoder, and no mask to walk its layers with
            why = (
                f"graph(s) {graphs} encoded an image prompt and graph {decoder}, a decoder layer's own forward (the "
                "decoder is split into per-layer graphs), ran on it unpruned: no graph handed the image's visual "
                "mask on to its layers (merged outside any graph, or by a pattern the passes do not know)"
            )
        elif pending.walked is not None:
            why = (
                f"graph {decoder} ran on the image prompt after {pending.walked.layer + 1} layers of its decoder, "
                f"which is split into per-layer graphs, and none was layer {pending.walked.prune_layer} "
                "(ERAConfig.layer): its visual tokens were not pruned"
            )
        elif handed_on is not None:
            why = (
                f"graph {handed_on.graph} merged an image prompt and handed its visual mask on, but graph "
                f"{decoder} ran the language model on other hidden states of its sequence (the merged embeddings "
                "changed outside a graph): its visual tokens were not pruned"
            )
        else:
            why = (
                f"graph(s) {graphs} encoded an image prompt and graph {decoder} ran decoder layers on it, but no "
                "graph pruned it: its visual tokens were not pruned (merged by a pattern the passes do not know, "
                "or in code outside a graph)"
            )
        self.tell(why)

    def _compact_caches(self, outputs: list, plan: GraphPlan, keep_index: Tensor, bias: Tensor, length: int) -> None:
        """The pruned layers' new keys and values [B, H, n', d] become CompactKV of the original
        length N, each row at its original position with its bias (0 everywhere without LAR); a
        sliding-window layer's, the last W - 1 original positions of them. A split decoder's layers
        after K cut their sequence where layer K did (``era::kept_tokens``): their rows are layer
        K's ``keep_index``, slot for slot."""
        # Each cache tensor gets its own positions and bias (12 bytes per row), as every decode append
        # leaves them: shared ones would make Dynamo guard on the aliasing, and the next generation's
        # first decode step would then compile once more than a plain compile does.
        for layer, i in plan.keys_outputs.items():
            j = plan.values_outputs[layer]
            for k in (i, j):
                outputs[k] = compact(outputs[k], keep_index.clone(), bias.clone(), length, plan.windows.get(layer))

    @staticmethod
    def _mark_pruned_lengths(outputs: list, plan: GraphPlan) -> None:
        """The pruned length is data: say so to the graph Dynamo compiles next from these outputs (the
        LM head after a split decoder), which would otherwise start static in it and recompile at the
        first new length. ``maybe_mark_dynamic``: a hint, never an error if that graph specialises."""
        compacted = set(plan.keys_outputs.values()) | set(plan.values_outputs.values())
        for i, dims in plan.data_dependent.items():  # the model's outputs (the published ones are stripped)
            if i < len(outputs) and i not in compacted and isinstance(outputs[i], Tensor):
                torch._dynamo.maybe_mark_dynamic(outputs[i], list(dims))

    def _hand_off(self, embeds: Tensor, handoff: HandedOnMask) -> None:
        self.handoffs[embeds] = handoff
        weakref.finalize(embeds, self._check_claimed, handoff)

    def _check_claimed(self, handoff: HandedOnMask) -> None:
        if handoff.claimed:
            return
        if self.pending is not None and self.pending.handoff is handoff:
            self._forget(self.pending)
        why = (
            f"graph {handoff.graph} merged {handoff.mask.sum(-1).tolist()} visual tokens per sample and handed "
            "them on, "
            "but no compiled graph received the merged embeddings (changed outside a graph?): "
            "pruning did not happen"
        )
        self.report.skipped.append(why)
        # at a tensor's death (a finalizer): no caller's frame to point at, and never raised, even strict
        warnings.warn(f"era_compile: {why}", RuntimeWarning, stacklevel=1)

    # ------------------------------------------------------------------ a decoder split per layer

    def layer_step(
        self, args: Sequence[Any], receivers: Sequence[int], prune_layer: int
    ) -> tuple[Any, LayerStep | None]:
        """The variant key and part of a call of a decoder layer's own graph (``passes/saliency.py``):
        layer 0 of a new walk when an input carries a handed-on mask, the next layer when one holds
        hidden states of the walking prompt's [B, N]; (None, None) for the unpruned variant. Asked
        twice for one call (when its graph is compiled, then run), it answers the same."""
        walk = self.walk  # an ended walk is no longer the runtime's
        again = None if walk is None else next((i for i in receivers if walk.last_input() is args[i]), None)
        # layer 0 receives the merged embeddings; or, changed outside a graph by an op that kept their
        # [B, N, D] (Granite's embedding multiplier), hidden states of their shape
        start = (
            None if again is not None else (self.carried(args, receivers) or self._handed_on_by_shape(args, receivers))
        )
        if walk is not None and again is not None:  # the same call, asked when compiling its variant, then running it
            index = again
        elif start is not None:
            index, handoff = start
            handoff.claimed = True  # the walk takes it up: its tensor's death tells nothing
            walk = self.walk = LayerWalk(handoff.mask, handoff.graph, prune_layer)
            weakref.finalize(args[index], self._end_walk, walk)  # the forward holds them until it returns
        elif walk is not None:
            same_prompt = (i for i in receivers if tuple(args[i].shape[:2]) == tuple(walk.visual_mask.shape))
            found = next(same_prompt, None)
            if found is None:  # another prompt's hidden states
                self._end_walk(walk)
                return None, None
            index = found
            walk.layer += 1
        else:
            return None, None
        walk.last_input = weakref.ref(args[index])
        if walk.layer < prune_layer - 1 or (walk.layer > prune_layer and not walk.pruned):
            return None, None  # before the layers that prune; or after a prune that fell back, told then
        role = "saliency" if walk.layer == prune_layer - 1 else "prune" if walk.layer == prune_layer else "kept"
        step = LayerStep(
            walk.layer,
            role,
            index,
            visual_mask=walk.visual_mask if role == "prune" else None,
            queries=walk.queries if role == "prune" else None,
            keys=walk.keys if role == "prune" else None,
            key_bias=walk.key_bias if role == "kept" else None,
        )
        return (role, index), step

    def _handed_on_by_shape(self, args: Sequence[Any], receivers: Sequence[int]) -> tuple[int, HandedOnMask] | None:
        """The waiting image's handed-on mask and the input of its [B, N], when no graph has claimed it."""
        handoff = self.pending.handoff if self.pending is not None else None
        if handoff is None or handoff.claimed:
            return None
        index = next((i for i in receivers if tuple(args[i].shape[:2]) == tuple(handoff.mask.shape)), None)
        return None if index is None else (index, handoff)

    def _pruned_on_the_walk(self, published: PrefillOutputs, bias: Tensor) -> None:
        walk = self.walk
        assert walk is not None  # ``layer_step`` gives the prune variant to a walk's layer K only
        walk.queries = walk.keys = None
        walk.keep_index, walk.log_bias, walk.key_bias = published.keep_index, bias, published.key_bias

    def _end_walk(self, walk: LayerWalk) -> None:
        if not walk.over and not walk.pruned and self.pending is not None:
            self.pending.walked = walk  # the graph that runs on the prompt next tells why it went unpruned
        walk.over = True
        walk.queries = walk.keys = walk.key_bias = walk.keep_index = walk.log_bias = None
        if self.walk is walk:
            self.walk = None

    def carried(self, args: Sequence[Any], receivers: Sequence[int]) -> tuple[int, HandedOnMask] | None:
        """The one input of ``args`` that carries a handed-on visual mask, if any."""
        found = [(i, self.handoffs.get(args[i])) for i in receivers]
        found = [(i, h) for i, h in found if h is not None]
        if len(found) > 1:
            raise RuntimeError(
                f"era_compile: inputs {[i for i, _ in found]} of one graph all carry merged "
                "image embeddings; expected one"
            )
        return found[0] if found else None


class RuntimeWrapper:
    """A compiled graph with the runtime around it: supply the added inputs, strip and act on
    what it publishes."""

    def __init__(self, runtime: Runtime, compiled: Callable, plan: GraphPlan):
        self.runtime, self.compiled, self.plan = runtime, compiled, plan

    def __call__(self, *args):
        self.runtime.before_call(self.plan)
        extra = [self.runtime.supply(a, args) for a in self.plan.added_inputs]
        outputs = [without_base(x) for x in self.compiled(*args, *extra)]
        return self.runtime.record(outputs, self.plan, args)


class Variants:
    """A graph that may receive merged embeddings, compiled once per input that carries them:
    ``key_of(args)`` gives the key and the visual mask the call carries (``CarriedVisual``, or
    None: the unpruned variant), ``build(args, carried)`` compiles the variant on first sight.
    The image's size is not part of the key: the pruned shapes are the data's. ``variants``
    maps each key to its compiled callable."""

    def __init__(
        self,
        runtime: Runtime,
        graph: int,
        key_of: Callable[[Sequence[Any]], tuple[Any, CarriedVisual | None]],
        build: Callable[[list[Any], CarriedVisual | None], Callable],
        example_inputs: Sequence[Any],
    ):
        self.runtime, self.graph, self.key_of, self.build = runtime, graph, key_of, build
        self.variants: dict[Any, Callable] = {}
        self.variant_for(example_inputs)

    def variant_for(self, args: Sequence[Any]) -> Callable:
        key, carried = self.key_of(args)
        if key not in self.variants:
            self.variants[key] = self.build(list(args), carried)
            self.runtime.report.variants.setdefault(self.graph, []).append(
                "unpruned" if carried is None else carried.describe()
            )
        return self.variants[key]

    def __call__(self, *args):
        return self.variant_for(args)(*args)
