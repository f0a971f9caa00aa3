"""ERA at K = 0 in vLLM's Qwen2-VL (``Qwen2VLForConditionalGeneration``).

Positions: Qwen2-VL's RoPE is M-RoPE, and vLLM lets the model supply a request's positions
(``get_mrope_input_positions``), so the kept image tokens keep their original (t, h, w) and the text
after the image keeps its original positions, as in the unpruned prompt and as era_compile's HF path
keeps them. Which tokens are kept is known only after the vision tower runs, so the positions vLLM
asks for up front hold the image's first k grid positions, and each kept token carries its own in
three columns of its embedding; the model writes them over the step's positions before the decoder
runs (the same columns-with-the-rows route as ``log b``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from era_compile.vllm.adapter import ERAModelMixin, ERAProcessorMixin


def mrope_layout(length: int, start: int, grid_h: int, grid_w: int, image_tokens: int) -> Tensor:
    """[3, length] M-RoPE positions of a prompt with one image whose ``image_tokens`` tokens start at
    ``start`` (its merged grid ``grid_h`` x ``grid_w``; fewer tokens than the grid: the first ones):
    text before at 0..start-1 in all three rows, the image at (0, h, w) + start, the text after it
    continuing from the grid's largest position + 1."""
    before = torch.arange(start).expand(3, -1)
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    grid = torch.stack([torch.zeros_like(hh), hh, ww]).reshape(3, -1) + start
    after_len = length - start - image_tokens
    after = torch.arange(after_len).expand(3, -1) + int(grid.max()) + 1
    return torch.cat([before, grid[:, :image_tokens], after], dim=1)


class ERAQwen2VLProcessor(ERAProcessorMixin, Qwen2VLMultiModalProcessor):
    def era_image_token(self) -> int:
        return int(self.info.get_hf_config().image_token_id)

    def era_visual_count(self, inputs: Any, result: Any, index: int) -> int:
        item = result["mm_kwargs"]["image"][index]
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        if item is None:
            raise ValueError("era: the image's grid is needed to lay its prompt out")
        return int(item["image_grid_thw"].data.prod()) // merge**2


@MULTIMODAL_REGISTRY.register_processor(
    ERAQwen2VLProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class ERAQwen2VLForConditionalGeneration(ERAModelMixin, Qwen2VLForConditionalGeneration):
    POSITION_COLUMNS = 3

    def _merged_grid(self, grid_thw: Any) -> tuple[int, int]:
        t, h, w = (int(x) for x in grid_thw)
        if t != 1:
            raise ValueError(f"era: an image of {t} frames")
        merge = self.config.vision_config.spatial_merge_size
        return h // merge, w // merge

    def era_positions(self, ids: Tensor, start: int, count: int, kwargs: dict, index: int) -> Tensor:
        grid_h, grid_w = self._merged_grid(kwargs["image_grid_thw"][index])
        return mrope_layout(ids.shape[0], start, grid_h, grid_w, count).to(ids.device)

    def era_position_columns(self, positions: Tensor, kept_visual: Tensor) -> Tensor:
        return positions[:, kept_visual].T

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        if self.era_config is None or not mm_features:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        (feature,) = mm_features  # the processor admits one image per request
        grid_h, grid_w = self._merged_grid(feature.data["image_grid_thw"].data)
        span = feature.mm_position
        positions = mrope_layout(len(input_tokens), span.offset, grid_h, grid_w, span.length)
        return positions, int(positions.max()) + 1 - len(input_tokens)
