"""ERA at K = 0 in vLLM's LLaVA (``LlavaForConditionalGeneration``, CLIP or SigLIP tower) and
LLaVA-NeXT (``LlavaNextForConditionalGeneration``: anyres crops and row newlines, so an image's token
count follows its size; the newline tokens are visual tokens of the pool, as in the HF path).

Positions: LLaVA's RoPE is 1-D and vLLM numbers a prompt's tokens 0..n'-1 itself, so the kept tokens
run at the positions of their slots in the served prompt (``pool.PoolLayout``; contiguous for one
image), while selection scores at the unpruned positions, as the HF path does. The tier compares with
an HF-path reference at the same positions.
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

from era_compile.vllm.adapter import ERAModelMixin, ERAProcessingInfoMixin, ERAProcessorMixin


class ERALlavaProcessingInfo(ERAProcessingInfoMixin, LlavaProcessingInfo):
    pass


class ERALlavaNextProcessingInfo(ERAProcessingInfoMixin, LlavaNextProcessingInfo):
    pass


class ERALlavaProcessor(ERAProcessorMixin, LlavaMultiModalProcessor):
    pass


class ERALlavaNextProcessor(ERAProcessorMixin, LlavaNextMultiModalProcessor):
    pass


def _build_info(ctx: Any) -> Any:
    info = _build_llava_or_pixtral_hf_info(ctx)
    return ERALlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


def _build_processor(info: Any, dummy_inputs: Any) -> Any:
    if not isinstance(info, ERALlavaProcessingInfo):
        raise NotImplementedError(f"era: the vLLM plugin serves CLIP/SigLIP LLaVA, not {type(info).__name__}")
    return ERALlavaProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class ERALlavaForConditionalGeneration(ERAModelMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA with ERA at K = 0 when the engine has an ``era`` section."""


@MULTIMODAL_REGISTRY.register_processor(
    ERALlavaNextProcessor, info=ERALlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class ERALlavaNextForConditionalGeneration(ERAModelMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with ERA at K = 0 when the engine has an ``era`` section."""
