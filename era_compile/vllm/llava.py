"""ERA at K = 0 in vLLM's LLaVA (``LlavaForConditionalGeneration``, CLIP or SigLIP tower) and
LLaVA-NeXT (``LlavaNextForConditionalGeneration``: anyres crops and row newlines, so an image's token
count follows its size; the newline tokens are visual tokens of the pool, as in the HF path).

Positions: LLaVA's RoPE is 1-D and vLLM numbers a prompt's tokens 0..n'-1 itself, so the kept tokens
run at contiguous positions in the pruned prompt (selection scores at the unpruned positions, as the
HF path does). The tier compares with an HF-path reference at the same positions.
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from era_compile.vllm.adapter import ERAModelMixin, ERAProcessorMixin


class _LlavaCounts:
    info: Any

    def era_image_token(self) -> int:
        return int(self.info.get_hf_config().image_token_index)

    def era_visual_count(self, inputs: Any, result: Any, index: int) -> int:
        images = inputs.mm_data_items.get_items("image", object)
        if hasattr(images, "get_feature_size"):  # precomputed embeddings
            return int(images.get_feature_size(index))
        size = images.get_image_size(index)
        return int(self.info.get_num_image_tokens(image_width=size.width, image_height=size.height))


class ERALlavaProcessor(_LlavaCounts, ERAProcessorMixin, LlavaMultiModalProcessor):
    pass


class ERALlavaNextProcessor(_LlavaCounts, ERAProcessorMixin, LlavaNextMultiModalProcessor):
    pass


def _build_processor(info: Any, dummy_inputs: Any) -> Any:
    if not isinstance(info, LlavaProcessingInfo):
        raise NotImplementedError(f"era: the vLLM plugin serves CLIP/SigLIP LLaVA, not {type(info).__name__}")
    return ERALlavaProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder
)
class ERALlavaForConditionalGeneration(ERAModelMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA with ERA at K = 0 when the engine has an ``era`` section."""


@MULTIMODAL_REGISTRY.register_processor(
    ERALlavaNextProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class ERALlavaNextForConditionalGeneration(ERAModelMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with ERA at K = 0 when the engine has an ``era`` section."""
