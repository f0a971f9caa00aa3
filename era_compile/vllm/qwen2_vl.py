"""ERA at K = 0 in vLLM's Qwen2-VL (``Qwen2VLForConditionalGeneration``).

Positions: Qwen2-VL's RoPE is M-RoPE, and vLLM lets the model supply a request's positions
(``get_mrope_input_positions``), so the kept image tokens keep their original (t, h, w) and the text
after each image keeps its original positions, as in the unpruned prompt and as era_compile's HF path
keeps them. Which tokens are kept is known only after the vision tower runs, so the positions vLLM
asks for up front hold each image's first grid positions, one per slot, and each kept token carries
its own in extra columns of its embedding (``pool.pack_positions``: two digits a coordinate, exact
in bf16); the model writes them over the step's positions before the decoder runs (the same
columns-with-the-rows route as ``log b``).
"""

from __future__ import annotations

from collections.abc import Sequence
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

from era_compile.vllm.adapter import (
    SLOT_STARTS_FIELD,
    SLOTS_FIELD,
    ERAModelMixin,
    ERAProcessingInfoMixin,
    ERAProcessorMixin,
    batch_rows,
)


def mrope_layout(length: int, images: list[tuple[int, int, int, int]]) -> Tensor:
    """[3, length] M-RoPE positions of a prompt whose images are ``(start, grid_h, grid_w, tokens)``: the
    image's first token, its merged grid, and how many of its tokens the prompt holds (fewer than the
    grid: the first ones, stand-ins for the kept tokens' own). Text runs on in all three rows from the
    previous piece's largest position + 1, an image sits at (0, h, w) from there, as Qwen2-VL lays a
    prompt out; so the text keeps its unpruned positions however many tokens each image holds."""
    pieces, cursor, next_position = [], 0, 0
    for start, grid_h, grid_w, tokens in images:
        pieces.append(torch.arange(start - cursor).expand(3, -1) + next_position)
        next_position += start - cursor
        hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
        grid = torch.stack([torch.zeros_like(hh), hh, ww]).reshape(3, -1) + next_position
        pieces.append(grid[:, :tokens])
        next_position, cursor = int(grid.max()) + 1, start + tokens
    pieces.append(torch.arange(length - cursor).expand(3, -1) + next_position)
    return torch.cat(pieces, dim=1)


class ERAQwen2VLProcessingInfo(ERAProcessingInfoMixin, Qwen2VLProcessingInfo):
    pass


class ERAQwen2VLProcessor(ERAProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ERAQwen2VLProcessor, info=ERAQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class ERAQwen2VLForConditionalGeneration(ERAModelMixin, Qwen2VLForConditionalGeneration):
    POSITION_COLUMNS = 3

    def _merged_grid(self, grid_thw: Any) -> tuple[int, int]:
        t, h, w = (int(x) for x in grid_thw)
        if t != 1:
            raise ValueError(f"era: an image of {t} frames")
        merge = self.config.vision_config.spatial_merge_size
        return h // merge, w // merge

    def era_positions(
        self, ids: Tensor, starts: Sequence[int], counts: Sequence[int], kwargs: dict, images: range
    ) -> Tensor:
        grids = [self._merged_grid(kwargs["image_grid_thw"][i]) for i in images]
        layout = [(start, h, w, count) for start, (h, w), count in zip(starts, grids, counts, strict=True)]
        return mrope_layout(ids.shape[0], layout).to(ids.device)

    def era_position_columns(self, positions: Tensor, kept_visual: Tensor) -> Tensor:
        return positions[:, kept_visual].T

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        if self.era_config is None or not mm_features:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        (pool,) = mm_features  # the processor makes a request's images one item
        data = pool.data
        grids = [self._merged_grid(grid) for grid in batch_rows(data["image_grid_thw"].data)]
        starts, slots = data[SLOT_STARTS_FIELD].data.tolist(), data[SLOTS_FIELD].data.tolist()
        layout = [(start, h, w, slot) for start, (h, w), slot in zip(starts, grids, slots, strict=True)]
        positions = mrope_layout(len(input_tokens), layout)
        return positions, int(positions.max()) + 1 - len(input_tokens)
