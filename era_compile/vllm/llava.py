"""ERA at K = 0 in vLLM's LLaVA (``LlavaForConditionalGeneration``): the processor, the model, and how
a request's selection travels from one to the other.

* The processor emits ``kept(T)`` placeholders per image instead of ``T`` (prompt accounting: the
  scheduler and the KV-cache manager see the pruned prompt from the start, as vLLM's EVS does for
  video), and gives each image item the request's unpruned prompt (``era_prompt``) and where its
  tokens start in it (``era_image_start``): DEP scores the image with the prompt's instruction
  tokens. The item's hash mixes in the prompt and the ERA settings, so vLLM's encoder cache and
  prefix cache never serve one prompt's selection, or one budget's, to another.
* ``embed_multimodal`` runs the vision tower, merges the image into its unpruned prompt, selects and
  recycles with ``selection.prune_prompt`` (the HF path's own functions), and returns the kept
  tokens' states with their ``log b`` as one extra column. The column rides through vLLM's encoder
  cache and its per-chunk slicing with the rows it belongs to.
* ``embed_input_ids`` strips the column into the step's ``StepBias``, which the attention layers
  (``attention.ERACPUAttentionImpl``) write into the paged cache beside each key.

Positions: LLaVA's RoPE is 1-D and vLLM numbers a prompt's tokens 0..n'-1, so the kept tokens run at
contiguous positions in the pruned prompt (selection itself scores at the unpruned positions, as the
HF path does). ``tests_vllm`` compares with an HF-path reference at the same positions.

With no ``era`` section the classes behave as vLLM's own, line for line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
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


class ERALlavaProcessor(LlavaMultiModalProcessor):
    def _era(self) -> ERAConfig | None:
        return config_of(self.info.ctx.model_config)

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self._era()
        if config is None:
            return updates
        return [_kept_only(update, config) for update in updates]

    def _get_mm_hashes(self, inputs: Any) -> Any:
        hashes = super()._get_mm_hashes(inputs)
        config = self._era()
        if config is None:
            return hashes
        salt = json.dumps([config.__dict__, list(inputs.prompt)], sort_keys=True, default=str)
        return {
            modality: [hashlib.sha256(f"{h}|era|{salt}".encode()).hexdigest() for h in items]
            for modality, items in hashes.items()
        }

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        result = super().apply(inputs, timing_ctx)
        config = self._era()
        if config is None or "image" not in result["mm_placeholders"]:
            return result
        ranges = result["mm_placeholders"]["image"]
        if len(ranges) > 1:
            raise ValueError(
                f"era: a request with {len(ranges)} images: the vLLM plugin prunes one image per request so far "
                "(a request's images are one pool in ERA, and vLLM fixes each image's placeholder count before "
                "the pool is scored)"
            )
        images = inputs.mm_data_items.get_items("image", object)
        full = self._unpruned_count(images, 0)
        (span,) = ranges
        prompt = list(result["prompt_token_ids"])
        unpruned = prompt[: span.offset] + [self.info.get_hf_config().image_token_index] * full
        unpruned += prompt[span.offset + span.length :]
        item = result["mm_kwargs"]["image"][0]
        if item is not None:  # None: vLLM's engine already holds this item (same hash: same prompt)
            field = MultiModalBatchedField()
            item[PROMPT_FIELD] = MultiModalFieldElem(data=torch.tensor(unpruned), field=field)
            item[START_FIELD] = MultiModalFieldElem(data=torch.tensor([span.offset]), field=field)
        return result

    def _unpruned_count(self, images: Any, index: int) -> int:
        if hasattr(images, "get_feature_size"):
            return int(images.get_feature_size(index))
        size = images.get_image_size(index)
        return int(self.info.get_num_image_tokens(image_width=size.width, image_height=size.height))


def _kept_only(update: Any, config: ERAConfig) -> Any:
    """A LLaVA prompt replacement that emits kept(T) image tokens where vLLM's emits T."""
    if not isinstance(update, PromptReplacement) or not callable(update.replacement):
        raise ValueError(f"era: cannot shrink the prompt update {update!r} of this model")
    replace = update.replacement

    def kept(item_idx: int) -> Any:
        tokens = replace(item_idx)
        if not isinstance(tokens, list) or len(set(tokens)) != 1:
            raise ValueError("era: LLaVA's image replacement was expected to repeat one token")
        return tokens[: config.kept(len(tokens))]

    return PromptReplacement(modality=update.modality, target=update.target, replacement=kept)


def _build_processor(info: Any, dummy_inputs: Any) -> Any:
    if not isinstance(info, LlavaProcessingInfo):
        raise NotImplementedError(f"era: the vLLM plugin serves CLIP/SigLIP LLaVA, not {type(info).__name__}")
    return ERALlavaProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder
)
class ERALlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.era_config = era_config_from(vllm_config.additional_config)
        self.era_step = StepBias()
        if self.era_config is not None:
            mark_layers(self.language_model, self.era_step)

    def embed_multimodal(self, **kwargs: object) -> Any:
        prompts = kwargs.pop(PROMPT_FIELD, None)
        starts = kwargs.pop(START_FIELD, None)
        images = super().embed_multimodal(**kwargs)
        if self.era_config is None or prompts is None or starts is None:
            return images  # vLLM's memory profiling: dummy images with no prompt
        return [
            self._prune_image(image, prompt, int(start))
            for image, prompt, start in zip(images, _rows(prompts), _rows(starts), strict=True)
        ]

    def _prune_image(self, image: Tensor, prompt: Tensor, start: int) -> Tensor:
        assert self.era_config is not None
        ids = prompt.to(image.device)
        visual = torch.zeros(ids.shape[0], dtype=torch.bool, device=image.device)
        visual[start : start + image.shape[0]] = True
        merged = super().embed_input_ids(ids, multimodal_embeddings=[image], is_multimodal=visual)
        layer = self.language_model.model.layers[0]
        positions = torch.arange(ids.shape[0], device=image.device)
        pruned = prune_prompt(layer, merged, positions, visual, self.era_config)
        anchors = visual[pruned.keep_index]
        log_bias = pruned.log_bias[anchors] if self.era_config.rectify else pruned.hidden.new_zeros(int(anchors.sum()))
        return torch.cat([pruned.hidden[anchors], log_bias[:, None].to(pruned.hidden.dtype)], dim=-1)

    def embed_input_ids(
        self, input_ids: Tensor, multimodal_embeddings: Any = None, *, is_multimodal: Tensor | None = None, **kw: Any
    ) -> Tensor:
        if self.era_config is None:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kw)
        self.era_step.log_bias = None
        if not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kw)
        width = self.config.text_config.hidden_size
        rows = [e[:, :width] for e in multimodal_embeddings]
        # An image embedded before the plugin's columns existed (vLLM's profiling run) has none: log b = 0.
        columns = [e[:, width] if e.shape[-1] > width else e.new_zeros(e.shape[0]) for e in multimodal_embeddings]
        log_bias = torch.zeros(input_ids.shape[0], dtype=rows[0].dtype, device=input_ids.device)
        assert is_multimodal is not None
        log_bias[is_multimodal] = torch.cat(columns)
        self.era_step.log_bias = log_bias
        return super().embed_input_ids(input_ids, rows, is_multimodal=is_multimodal, **kw)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.era_step.log_bias = None  # a step's bias never reaches the next step's keys


def _rows(batched: Any) -> Sequence[Tensor]:
    """A batched field as vLLM hands it over: a stacked tensor, or a list when the items' shapes differ."""
    if isinstance(batched, Tensor):
        return list(batched.unbind(0))
    if isinstance(batched, Mapping):
        raise TypeError(f"unexpected batched field {type(batched).__name__}")
    return list(batched)
