"""The frozen records passes hand each other, and the contracts between a graph and the runtime.

Each pass returns one record type (``GraphPass.provides``); later passes read it by type and
never change it. Nodes inside a record are the nodes of the graph being rewritten; a pass
that replaces a node another record names returns the replacement in its own record.

Two kinds of contract cross from a compiled graph to ``era_compile.runtime``:

* trailing outputs (``PrefillOutputs``, ``HandoffOutputs``): what a graph returns after the
  model's own outputs. The pass that appends them builds the dataclass from nodes and appends
  ``values()``; the runtime strips them with ``take`` into the same dataclass of tensors.
* added inputs (``VisualMaskInput``, ``BudgetInput``): placeholders a pass appended; the runtime
  supplies their values on every call, in the order they were added.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.fx as fx

V = TypeVar("V")  # fx.Node inside a pass, torch.Tensor in the runtime


# --------------------------------------------------------------------------- from the runtime


@dataclass(frozen=True)
class CarriedVisual:
    """Visual positions that reached this graph with its input embeddings: the merge ran in an
    earlier graph, which handed its mask on (``handoff``, ``era_compile.runtime``)."""

    input_index: int  # the placeholder holding the merged embeddings [B, N, D]
    mask: torch.Tensor  # the example's bool [B, N] visual mask (a real tensor)

    def describe(self) -> str:
        return f"visual tokens on input {self.input_index}"


@dataclass(frozen=True)
class LayerStep:
    """A decoder layer's own graph, called on an image prompt's way through a decoder that Dynamo
    split into per-layer graphs (``era_compile.runtime.LayerWalk``): the layer it runs there, counted
    in call order, and its part in the pruning. ``role``: ``saliency`` (layer K - 1: hands on its
    queries and keys), ``prune`` (layer K: selects and recycles, runs on the kept tokens), ``kept``
    (after K: runs on the tokens layer K kept). The loop between the graphs hands every layer the
    whole prompt's [B, N] (hidden states, positions, masks), so each layer from K on cuts it at its
    entry and writes its states back to their positions at its exit."""

    layer: int
    role: str
    hidden_input: int  # the placeholder holding the hidden states [B, N, D]
    visual_mask: torch.Tensor | None = None  # prune: the example's bool [B, N] (a real tensor)
    queries: torch.Tensor | None = None  # prune at K > 0: layer K - 1's, what the saliency reads
    keys: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None  # kept: the example's float32 [B, N], layer K's (``era::unprune``)

    def describe(self) -> str:
        return f"layer {self.layer} of a split decoder: {self.role}"


# --------------------------------------------------------------------------- added inputs


@dataclass(frozen=True)
class AddedInput:
    """A placeholder a pass appended; ``example`` is its fake value (the graph's own sizes)."""

    name: str
    example: Any = field(compare=False, repr=False)


@dataclass(frozen=True)
class VisualMaskInput(AddedInput):
    """The bool [B, N] visual mask carried by the merged embeddings at input ``source_input``."""

    source_input: int = -1


@dataclass(frozen=True)
class WalkInput(AddedInput):
    """What the runtime's ``LayerWalk`` holds for this call: its attribute ``field`` (``visual_mask``,
    ``queries``, ``keys`` or ``key_bias``)."""

    field: str = ""


@dataclass(frozen=True)
class BudgetInput(AddedInput):
    """The keep budget ``era::select`` reads on every call (``ops.prune.budget_tensor``)."""


# --------------------------------------------------------------------------- trailing outputs


class TrailingOutputs(Generic[V]):
    """Outputs a graph returns after the model's own, one dataclass field each, in field order;
    a trailing optional field may be absent (None)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every subclass is a dataclass

    def values(self) -> tuple[V, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    @classmethod
    def take(cls, outputs: list[Any], count: int):
        """Strip the last ``count`` outputs (in place) into an instance of this contract."""
        tail = outputs[len(outputs) - count :]
        del outputs[len(outputs) - count :]
        return cls(*tail)


@dataclass(frozen=True)
class PrefillOutputs(TrailingOutputs[V]):
    """What a pruned prefill tells the runtime (appended by ``publish``)."""

    keep_index: V  # int64 [B, n'] original positions kept, ascending
    log_bias: V  # float32 [B, n'] LAR bias per kept key (0 off the anchors)
    key_visible: V  # bool [B, N]: which original positions the last query may see
    samples: V  # int64 [B, 2]: each sample's visual tokens T_b and kept ones k_b
    key_bias: V | None = None  # float32 [B, N], a split decoder's layer K's: what its later layers keep


@dataclass(frozen=True)
class SaliencyOutputs(TrailingOutputs[V]):
    """What layer K - 1's own graph hands on for layer K's selection (appended by ``saliency``)."""

    queries: V  # its attention call's queries [B, H, N, d]
    keys: V  # and keys [B, H_kv, N, d]


@dataclass(frozen=True)
class HandoffOutputs(TrailingOutputs[V]):
    """What a merge-only graph hands on (appended by ``handoff``)."""

    visual_mask: V  # bool [B, N] of the merged embeddings it returns


# --------------------------------------------------------------------------- pass records


@dataclass(frozen=True)
class VisualSpan:
    """Where the image features enter the sequence (``span``)."""

    merge: fx.Node  # the merged embeddings: the masked_scatter, or the input that carries them
    visual_mask: fx.Node  # bool [B, N], True at visual positions
    batch: Any  # B (int, or SymInt in a dynamic graph)
    seq_len: Any  # N (int, or SymInt)
    visual_tokens: int | None  # of the whole batch of the example, for the report (data, not a shape);
    # None where no shape holds it (a ``where`` merge: features at full length)
    carried_by_input: int | None = None  # the input the merged embeddings arrived on


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer of the language model."""

    index: int  # position among the language model's layers, 0-based
    module_path: str  # e.g. "L['self'].language_model.layers.3"
    attention: fx.Node  # its scaled_dot_product_attention call (as found; ``attention`` replaces it)
    nodes: frozenset[fx.Node]  # every node traced inside the layer's module
    hidden_in: fx.Node  # the residual stream entering the layer, [B, N, D]


@dataclass(frozen=True)
class DecoderLayers:
    """The language model's decoder layers after the image merge (``layers``)."""

    layers: tuple[DecoderLayer, ...]
    # a hybrid decoder's layers that call no softmax attention (linear attention, recurrences, short
    # convolutions), by number: they run on the kept tokens from K on, and have no queries to score with
    without_attention: frozenset[int] = frozenset()

    def __getitem__(self, i):
        return self.layers[i]

    def by_index(self, index: int) -> DecoderLayer | None:
        """The layer numbered ``index`` (a decoder layer's own graph holds one layer, of any number)."""
        return next((layer for layer in self.layers if layer.index == index), None)

    def __len__(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class CachedLayer:
    """A decoder layer's KV-cache write."""

    index: int  # module index: "...layers.3" is layer 3
    keys: fx.Node  # cat([past, new], dim=2): the cached keys after this call
    values: fx.Node
    keys_output: int | None  # position of the cached keys among the graph outputs; None where the
    values_output: int | None  # layer caches part of ``keys`` (a decode step over a two-part cache)
    past_keys: fx.Node | None  # the graph input holding the past keys (decode), else None
    compact: bool = False  # the past keys are a CompactKV (a pruned layer's cache)
    window_start: int | None = None  # a sliding-window layer caches ``keys[..., window_start:, :]``


@dataclass(frozen=True)
class KVCache:
    """Every KV-cache write of the graph (``kvcache``)."""

    layers: tuple[CachedLayer, ...]
    written_in_place: tuple[int, ...] = ()  # layers whose cache is a graph input updated in place

    def layer(self, index: int) -> CachedLayer | None:
        return next((c for c in self.layers if c.index == index), None)


@dataclass(frozen=True)
class PruneSite:
    """Where this graph's sequence is cut to the kept tokens, for the passes after it: layer K's
    selection (``prune``), or the entry of a split decoder's later layer, cut where layer K cut
    (``kept``)."""

    layer: int  # the first layer that runs on the kept tokens here
    keep_index: fx.Node  # int64 [B, n'] original positions kept, ascending
    hidden_kept: fx.Node  # [B, n', D] the residual stream entering that layer, pruned
    log_bias: fx.Node  # float32 [B, n'] LAR bias per kept key (0 off the anchors)
    samples: fx.Node | None  # int64 [B, 2] each sample's visual tokens T_b and kept ones k_b (None:
    # ``kept``, which selects nothing)
    downstream: frozenset[fx.Node]  # the nodes that ran on the cut when it was made
    attention_mask: fx.Node | None  # that layer's mask over the original positions, if any


@dataclass(frozen=True)
class RestoredSequence:
    """What ``restore`` did at the exit of a split decoder's layer graph: the outputs it wrote back to
    the prompt's positions ([B, n', D] -> [B, N, D]), and the key bias [B, N] ``era::unprune`` gave
    with them (layer K publishes it: the later layers cut their sequence by it)."""

    outputs: tuple[int, ...]
    key_bias: fx.Node


@dataclass(frozen=True)
class RectifiedAttention:
    """Attention calls of a pruned prefill turned into ``era::biased_attention`` (``attention``):
    per layer index the new node, the kernel chosen, and whether the bias holds LAR's ``log b``
    (``rectify``) or only blocks the empty slots."""

    calls: tuple[tuple[int, fx.Node], ...] = ()
    kernel: str | None = None
    lar: bool = True

    @property
    def layers(self) -> list[int]:
        return [index for index, _ in self.calls]


@dataclass(frozen=True)
class Handoff:
    """``handoff``: the output holding the merged embeddings, and what trails the outputs."""

    embeddings_output: int
    outputs: HandoffOutputs
