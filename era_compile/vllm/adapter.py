"""ERA at K = 0 in a vLLM multimodal model: the processor side and the model side, shared by every
model family the plugin serves (``llava.py``, ``qwen2_vl.py`` say only what differs).

* **Processor** (``ERAProcessorMixin``): after vLLM's own processing, a request's images become one
  vLLM item, the pool (``pool.py``): the served prompt gives image i ``min(T_i, k)`` slots, with k
  the request's budget (prompt accounting: the scheduler and the KV-cache manager see the pruned
  prompt from the start, as vLLM's EVS does for video), and the item carries the unpruned prompt and
  the layout: DEP scores the images with the prompt's instruction tokens. The item's hash mixes in
  the prompt and the settings, so vLLM's encoder cache and prefix cache never serve one prompt's
  selection, or one budget's, to another.
* **Model** (``ERAModelMixin``): ``embed_multimodal`` runs the vision tower on every image of the
  pool, merges them into the unpruned prompt, selects and recycles jointly with
  ``selection.prune_prompt`` (the HF path's functions) and returns the slots' states (each image's
  anchors, then its dead slots) with extra columns: ``log b``, then the family's position columns
  (M-RoPE: the anchors' original (t, h, w)). vLLM caches and slices encoder outputs by rows, so the
  columns stay with their tokens through the encoder cache, chunked prefill and recompute.
  ``embed_input_ids`` strips them into the step's ``StepBias``; the attention layers
  (``attention.ERACPUAttentionImpl``) write ``log b`` into the paged cache beside each key.

With no ``era`` section everything here runs vLLM's own code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFieldElem,
    MultiModalFlatField,
    MultiModalKwargsItem,
    MultiModalKwargsItems,
    PlaceholderRange,
)

from era_compile.config import ERAConfig
from era_compile.vllm.attention import StepBias, mark_layers
from era_compile.vllm.config import era_config_from
from era_compile.vllm.pool import (
    DEAD_SLOT_LOG_BIAS,
    PoolLayout,
    pack_positions,
    plan_pool,
    pool_capacity,
    unpack_positions,
)
from era_compile.vllm.selection import prune_prompt

# Set on vLLM's ModelConfig by plugin.bridge_config: the processor is built from the ModelConfig alone.
MODEL_CONFIG_ATTRIBUTE = "era_compile_config"
# A pool item's layout fields (pool.PoolLayout): the unpruned prompt, each image's start in it, and
# its slots' start and count in the served prompt.
PROMPT_FIELD = "era_prompt"
STARTS_FIELD = "era_image_starts"
SLOT_STARTS_FIELD = "era_slot_starts"
SLOTS_FIELD = "era_slots"


def config_of(model_config: Any) -> ERAConfig | None:
    fields = getattr(model_config, MODEL_CONFIG_ATTRIBUTE, None)
    return None if fields is None else ERAConfig(**fields)


class ERAProcessingInfoMixin:
    """Before a vLLM ``BaseProcessingInfo`` in the bases. vLLM sizes its encoder cache, and refuses
    larger items, by the most tokens one item embeds; under ERA an item is a request's pool, which
    can hold more than one image's tokens (``pool.pool_capacity``, at the per-prompt image limit)."""

    ctx: Any

    @functools.cached_property
    def era_config(self) -> ERAConfig | None:
        # read once: vLLM builds its processors after the engine's config hook set the settings
        return config_of(self.ctx.model_config)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        base = super().get_mm_max_tokens_per_item(seq_len, mm_counts)  # type: ignore[misc]
        config = self.era_config
        if config is None:
            return base
        limit = max(1, self.ctx.get_mm_config().get_limit_per_prompt("image"))
        return {**(base or {}), "image": pool_capacity(config, self.get_max_image_tokens(), limit, seq_len)}  # type: ignore[attr-defined]


class ERAProcessorMixin:
    """Before a vLLM ``BaseMultiModalProcessor`` in the bases, with an ``ERAProcessingInfoMixin`` info:
    vLLM's own processing, then the request's images become one pool item laid out by
    ``pool.plan_pool``."""

    info: ERAProcessingInfoMixin

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        result = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        config = self.info.era_config
        if config is None:
            return result
        others = sorted(m for m in result["mm_placeholders"] if m != "image")
        if others:
            raise ValueError(f"era: the vLLM plugin prunes images; this request has {others}")
        ranges = result["mm_placeholders"].get("image", [])
        if not ranges:
            return result
        for span in ranges:
            if span.is_embed is not None and not bool(span.is_embed.all()):
                raise ValueError("era: an image placeholder with tokens that are not the image's own")
        layout = plan_pool(result["prompt_token_ids"], [(r.offset, r.length) for r in ranges], config)
        items = list(result["mm_kwargs"]["image"])
        if any(item is None for item in items):  # bridge_config turns vLLM's processor cache off
            raise RuntimeError("era: an image came back from vLLM's processor cache; it must be off")
        salt = json.dumps([config.__dict__, list(layout.unpruned), result["mm_hashes"]["image"]], default=str)
        mask = torch.tensor(layout.embed_mask())
        result["prompt_token_ids"] = layout.served_prompt()
        result["mm_kwargs"] = MultiModalKwargsItems({"image": [pool_item(items, layout)]})
        result["mm_hashes"] = {"image": [hashlib.sha256(salt.encode()).hexdigest()]}
        result["mm_placeholders"] = {
            "image": [PlaceholderRange(layout.slot_starts[0], len(mask), None if bool(mask.all()) else mask)]
        }
        return result


def pool_item(items: Sequence[Any], layout: PoolLayout) -> Any:
    """The request's image items as one vLLM item. Each field holds all the images' data such that
    vLLM's batching of pool items hands the model what it would hand for all their images as separate
    items (flat fields concatenate; a batched field becomes a flat list that ``_rebatch`` stacks), and
    the layout rides in four fields of its own (kept on the CPU: M-RoPE reads them when a prefix-cache
    hit strips the rest)."""
    fields = {}
    for key in items[0]:
        elems = [item[key] for item in items]
        field = elems[0].field
        if isinstance(field, MultiModalBatchedField):
            flat = MultiModalFlatField(slices=[slice(0, len(elems))], dim=0, keep_on_cpu=field.keep_on_cpu)
            fields[key] = MultiModalFieldElem(data=[e.data for e in elems], field=flat)
        elif isinstance(field, MultiModalFlatField) and all(isinstance(e.data, Tensor) for e in elems):
            fields[key] = MultiModalFieldElem(data=torch.cat([e.data for e in elems], dim=field.dim), field=field)
        else:
            raise ValueError(f"era: cannot pool the images' field {key!r} ({type(field).__name__})")
    per_pool = MultiModalBatchedField(keep_on_cpu=True)
    for name, values in (
        (PROMPT_FIELD, layout.unpruned),
        (STARTS_FIELD, layout.starts),
        (SLOT_STARTS_FIELD, layout.slot_starts),
        (SLOTS_FIELD, layout.slots),
    ):
        fields[name] = MultiModalFieldElem(data=torch.tensor(values), field=per_pool)
    return MultiModalKwargsItem(fields)


def _rebatch(value: Any) -> Any:
    """A pooled batched field as vLLM batches separate items: stacked where the shapes agree."""
    if isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
        if all(v.shape == value[0].shape for v in value):
            return torch.stack(value)
    return value


class ERAModelMixin:
    """Before a vLLM multimodal model class in the bases. A family gives the unpruned prompt's
    positions for selection (``era_positions``) and, where vLLM lets the model supply positions,
    the kept tokens' own (``era_position_columns``, ``POSITION_COLUMNS`` of them)."""

    POSITION_COLUMNS = 0
    config: Any
    language_model: Any

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.era_config = era_config_from(vllm_config.additional_config)
        self.era_step = StepBias()
        if self.era_config is not None:
            mark_layers(self.language_model, self.era_step)

    def era_positions(
        self, ids: Tensor, starts: Sequence[int], counts: Sequence[int], kwargs: dict, images: range
    ) -> Tensor:
        """The unpruned prompt's positions, as the model's rotary embedding takes them: its images start at
        ``starts`` with ``counts`` tokens each (``kwargs``: the batch's image inputs, ``images``: this
        pool's among them)."""
        return torch.arange(ids.shape[0], device=ids.device)

    def era_position_columns(self, positions: Tensor, kept_visual: Tensor) -> Tensor:
        """[k, POSITION_COLUMNS] positions the kept image tokens carry to the step that runs them."""
        return positions.new_zeros(kept_visual.shape[0], 0)

    def embed_multimodal(self, **kwargs: object) -> Any:
        pool = {name: kwargs.pop(name, None) for name in (PROMPT_FIELD, STARTS_FIELD, SLOT_STARTS_FIELD, SLOTS_FIELD)}
        if self.era_config is None or pool[PROMPT_FIELD] is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]  # vLLM's profiling: no pools
        kwargs = {key: _rebatch(value) for key, value in kwargs.items()}
        images = super().embed_multimodal(**kwargs)  # type: ignore[misc]  # every image of every pool
        out, first = [], 0
        for prompt, starts, slots in zip(
            batch_rows(pool[PROMPT_FIELD]), batch_rows(pool[STARTS_FIELD]), batch_rows(pool[SLOTS_FIELD]), strict=True
        ):
            members = range(first, first + starts.shape[0])
            out.append(
                self._prune_pool([images[i] for i in members], prompt, starts.tolist(), slots.tolist(), kwargs, members)
            )
            first = members.stop
        if first != len(images):
            raise RuntimeError(f"era: {len(images)} images for pools of {first}")
        return out

    def _prune_pool(
        self, images: list[Tensor], prompt: Tensor, starts: list[int], slots: list[int], kwargs: dict, members: range
    ) -> Tensor:
        """A request's images merged into its unpruned prompt, selected and recycled as one pool: the
        rows of its slots, each image's anchors in order, then its dead slots; [sum(slots), D + 1 +
        2 * POSITION_COLUMNS]: the state, log b, the positions (``pool.pack_positions``)."""
        assert self.era_config is not None
        ids = prompt.to(images[0].device)
        counts = [image.shape[0] for image in images]
        visual = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for start, count in zip(starts, counts, strict=True):
            visual[start : start + count] = True
        merged = super().embed_input_ids(ids, multimodal_embeddings=images, is_multimodal=visual)  # type: ignore[misc]
        positions = self.era_positions(ids, starts, counts, kwargs, members)
        pruned = prune_prompt(self.language_model.model.layers[0], merged, positions, visual, self.era_config)
        if not self.era_config.rectify:
            pruned = dataclasses.replace(pruned, log_bias=torch.zeros_like(pruned.log_bias))
        rows = []
        for start, count, slot in zip(starts, counts, slots, strict=True):
            mine = (pruned.keep_index >= start) & (pruned.keep_index < start + count)
            hidden, log_bias, index = pruned.hidden[mine], pruned.log_bias[mine], pruned.keep_index[mine]
            dead = slot - hidden.shape[0]
            if dead < 0:
                raise RuntimeError(f"era: an image kept {hidden.shape[0]} tokens in {slot} slots")
            hidden = torch.cat([hidden, hidden.new_zeros(dead, hidden.shape[1])])
            log_bias = torch.cat([log_bias, log_bias.new_full((dead,), DEAD_SLOT_LOG_BIAS)])
            index = torch.cat([index, index.new_full((dead,), start)])  # dead slots: any position, no weight
            columns = pack_positions(self.era_position_columns(positions, index), hidden.dtype)
            rows.append(torch.cat([hidden, log_bias[:, None].to(hidden.dtype), columns], dim=-1))
        return torch.cat(rows)

    def embed_input_ids(
        self, input_ids: Tensor, multimodal_embeddings: Any = None, *, is_multimodal: Tensor | None = None, **kw: Any
    ) -> Tensor:
        base = super().embed_input_ids  # type: ignore[misc]
        if self.era_config is None:
            return base(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kw)
        self.era_step.log_bias, self.era_step.positions = None, None
        if not multimodal_embeddings:
            return base(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kw)
        assert is_multimodal is not None
        width = self.config.get_text_config().hidden_size
        rows = [e[:, :width] for e in multimodal_embeddings]
        if any(e.shape[-1] == width for e in multimodal_embeddings):
            return base(input_ids, rows, is_multimodal=is_multimodal, **kw)  # vLLM's profiling run: no columns
        log_bias = torch.zeros(input_ids.shape[0], dtype=rows[0].dtype, device=input_ids.device)
        log_bias[is_multimodal] = torch.cat([e[:, width] for e in multimodal_embeddings])
        self.era_step.log_bias = log_bias
        if self.POSITION_COLUMNS:
            kept = unpack_positions(torch.cat([e[:, width + 1 :] for e in multimodal_embeddings]))
            self.era_step.positions = (is_multimodal, kept.T)
        return base(input_ids, rows, is_multimodal=is_multimodal, **kw)

    def forward(self, input_ids: Any, positions: Tensor, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.era_step.positions is not None:  # the kept image tokens at their own positions
                mask, kept = self.era_step.positions
                positions[..., : mask.shape[0]][..., mask] = kept.to(positions.device, positions.dtype)
            return super().forward(input_ids, positions, *args, **kwargs)  # type: ignore[misc]
        finally:
            self.era_step.log_bias, self.era_step.positions = None, None  # never reaches the next step


def batch_rows(batched: Any) -> Sequence[Tensor]:
    """A batched field as vLLM hands it over: a stacked tensor, or a list when the items' shapes differ."""
    if isinstance(batched, Tensor):
        return list(batched.unbind(0))
    if isinstance(batched, Mapping):
        raise TypeError(f"unexpected batched field {type(batched).__name__}")
    return list(batched)
