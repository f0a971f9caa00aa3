"""ERA at K = 0 in a vLLM multimodal model: the processor side and the model side, shared by every
model family the plugin serves (``llava.py``, ``qwen2_vl.py`` say only what differs).

* **Processor** (``ERAProcessorMixin``): each image gets ``kept(T)`` placeholders instead of ``T``
  (prompt accounting: the scheduler and the KV-cache manager see the pruned prompt from the start,
  as vLLM's EVS does for video), and carries the request's unpruned prompt (``era_prompt``) and
  where its tokens start in it (``era_image_start``): DEP scores the image with the prompt's
  instruction tokens. The item's hash mixes in the prompt and the settings, so vLLM's encoder cache
  and prefix cache never serve one prompt's selection, or one budget's, to another.
* **Model** (``ERAModelMixin``): ``embed_multimodal`` runs the vision tower, merges the image into its
  unpruned prompt, selects and recycles with ``selection.prune_prompt`` (the HF path's functions) and
  returns the kept tokens' states with extra columns: ``log b``, then the family's position columns
  (M-RoPE: the anchors' original (t, h, w)). vLLM caches and slices encoder outputs by rows, so the
  columns stay with their tokens through the encoder cache, chunked prefill and recompute.
  ``embed_input_ids`` strips them into the step's ``StepBias``; the attention layers
  (``attention.ERACPUAttentionImpl``) write ``log b`` into the paged cache beside each key.

With no ``era`` section everything here runs vLLM's own code.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem
from vllm.multimodal.processing import PromptReplacement

from era_compile.config import ERAConfig
from era_compile.vllm.attention import StepBias, mark_layers
from era_compile.vllm.config import era_config_from
from era_compile.vllm.selection import prune_prompt

# Set on vLLM's ModelConfig by plugin.bridge_config: the processor is built from the ModelConfig alone.
MODEL_CONFIG_ATTRIBUTE = "era_compile_config"
PROMPT_FIELD = "era_prompt"
START_FIELD = "era_image_start"


def config_of(model_config: Any) -> ERAConfig | None:
    fields = getattr(model_config, MODEL_CONFIG_ATTRIBUTE, None)
    return None if fields is None else ERAConfig(**fields)


class ERAProcessorMixin:
    """Before a vLLM ``BaseMultiModalProcessor`` in the bases. A family says how many tokens its
    image has unpruned (``era_visual_count``) and which token stands for one (``era_image_token``)."""

    info: Any

    def era_visual_count(self, inputs: Any, result: Any, index: int) -> int:
        raise NotImplementedError

    def era_image_token(self) -> int:
        raise NotImplementedError

    @functools.cached_property
    def _era(self) -> ERAConfig | None:
        # read once: vLLM builds the processor after the engine's config hook set the settings
        return config_of(self.info.ctx.model_config)

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        config = self._era
        if config is None:
            return updates
        return [_kept_only(update, config) if update.modality == "image" else update for update in updates]

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        config = self._era
        if config is None:
            return hashes
        salt = json.dumps([config.__dict__, list(inputs.prompt)], sort_keys=True, default=str)
        return {
            modality: [hashlib.sha256(f"{h}|era|{salt}".encode()).hexdigest() for h in items]
            for modality, items in hashes.items()
        }

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        result = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        config = self._era
        if config is None:
            return result
        others = sorted(m for m in result["mm_placeholders"] if m != "image")
        if others:
            raise ValueError(f"era: the vLLM plugin prunes images; this request has {others}")
        ranges = result["mm_placeholders"].get("image", [])
        if not ranges:
            return result
        if len(ranges) > 1:
            raise ValueError(
                f"era: a request with {len(ranges)} images: the vLLM plugin prunes one image per request so far "
                "(a request's images are one pool in ERA, and vLLM fixes each image's placeholder count before "
                "the pool is scored)"
            )
        (span,) = ranges
        prompt = list(result["prompt_token_ids"])
        full = self.era_visual_count(inputs, result, 0)
        unpruned = prompt[: span.offset] + [self.era_image_token()] * full + prompt[span.offset + span.length :]
        item = result["mm_kwargs"]["image"][0]
        if item is not None:  # None: vLLM's engine already holds this item (same hash: same prompt)
            field = MultiModalBatchedField()
            item[PROMPT_FIELD] = MultiModalFieldElem(data=torch.tensor(unpruned), field=field)
            item[START_FIELD] = MultiModalFieldElem(data=torch.tensor([span.offset]), field=field)
        return result


def _kept_only(update: Any, config: ERAConfig) -> Any:
    """An image's prompt replacement that emits kept(T) image tokens where vLLM's emits T."""
    if not isinstance(update, PromptReplacement) or not callable(update.replacement):
        raise ValueError(f"era: cannot shrink the prompt update {update!r} of this model")
    replace = update.replacement

    def kept(item_idx: int) -> Any:
        tokens = replace(item_idx)
        if not isinstance(tokens, list) or len(set(tokens)) != 1:
            raise ValueError("era: the image's replacement was expected to repeat one token")
        return tokens[: config.kept(len(tokens))]

    return PromptReplacement(modality=update.modality, target=update.target, replacement=kept)


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

    def era_positions(self, ids: Tensor, start: int, count: int, kwargs: dict, index: int) -> Tensor:
        """The unpruned prompt's positions, as the model's rotary embedding takes them (``kwargs``: the
        batch's multimodal inputs, ``index``: this image's among them)."""
        return torch.arange(ids.shape[0], device=ids.device)

    def era_position_columns(self, positions: Tensor, kept_visual: Tensor) -> Tensor:
        """[k, POSITION_COLUMNS] positions the kept image tokens carry to the step that runs them."""
        return positions.new_zeros(kept_visual.shape[0], 0)

    def embed_multimodal(self, **kwargs: object) -> Any:
        prompts = kwargs.pop(PROMPT_FIELD, None)
        starts = kwargs.pop(START_FIELD, None)
        images = super().embed_multimodal(**kwargs)  # type: ignore[misc]
        if self.era_config is None or prompts is None or starts is None:
            return images  # vLLM's memory profiling: dummy images with no prompt
        return [
            self._prune_image(image, prompt, int(start), kwargs, index)
            for index, (image, prompt, start) in enumerate(zip(images, _rows(prompts), _rows(starts), strict=True))
        ]

    def _prune_image(self, image: Tensor, prompt: Tensor, start: int, kwargs: dict, index: int) -> Tensor:
        assert self.era_config is not None
        ids = prompt.to(image.device)
        visual = torch.zeros(ids.shape[0], dtype=torch.bool, device=image.device)
        visual[start : start + image.shape[0]] = True
        merged = super().embed_input_ids(ids, multimodal_embeddings=[image], is_multimodal=visual)  # type: ignore[misc]
        positions = self.era_positions(ids, start, image.shape[0], kwargs, index)
        pruned = prune_prompt(self.language_model.model.layers[0], merged, positions, visual, self.era_config)
        anchors = visual[pruned.keep_index]
        rows = pruned.hidden[anchors]
        log_bias = pruned.log_bias[anchors] if self.era_config.rectify else rows.new_zeros(rows.shape[0])
        columns = self.era_position_columns(positions, pruned.keep_index[anchors]).to(rows.dtype)
        return torch.cat([rows, log_bias[:, None].to(rows.dtype), columns], dim=-1)

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
            kept = torch.cat([e[:, width + 1 :] for e in multimodal_embeddings]).round().long()
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


def _rows(batched: Any) -> Sequence[Tensor]:
    """A batched field as vLLM hands it over: a stacked tensor, or a list when the items' shapes differ."""
    if isinstance(batched, Tensor):
        return list(batched.unbind(0))
    if isinstance(batched, Mapping):
        raise TypeError(f"unexpected batched field {type(batched).__name__}")
    return list(batched)
