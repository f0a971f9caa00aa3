"""The vLLM general plugin (entry point ``vllm.general_plugins``: ``era = era_compile.vllm.plugin:register``).

vLLM calls ``register`` in every process it starts. It registers three things, each inert unless the
engine's ``additional_config`` has an ``era`` section:

* the model class for the architectures the plugin serves (``ARCHITECTURES``), which behaves as vLLM's
  own when ERA is off;
* a config hook for every architecture vLLM knows (vLLM's ``MODELS_CONFIG_MAP``, chained to the entry
  it replaces, run once as the engine's config is built): it validates the ``era`` section (a bad
  field, a model or platform the plugin does not prune, stops the engine with the name) and puts the
  settings on the ModelConfig, the only config vLLM builds a multimodal processor from;
* the attention backends with LAR under vLLM's ``CPU_ATTN`` and ``FLASH_ATTN`` names
  (``attention.ERACPUAttentionBackend``, ``flash_attention.ERAFlashAttentionBackend``, imported only
  when vLLM picks it); each runs vLLM's kernel unchanged for any layer the model did not mark.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "era_compile.vllm.llava:ERALlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "era_compile.vllm.llava:ERALlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "era_compile.vllm.qwen2_vl:ERAQwen2VLForConditionalGeneration",
}


def bridge_config(vllm_config: Any) -> None:
    """Validate ``additional_config['era']`` and hand it to the multimodal processor via the ModelConfig.
    A model or platform the plugin does not prune is refused here, before anything loads: an ``era``
    section is never ignored."""
    from era_compile.vllm.adapter import MODEL_CONFIG_ATTRIBUTE
    from era_compile.vllm.config import SECTION, era_config_from

    config = era_config_from(vllm_config.additional_config)
    if config is not None:
        from vllm.platforms import current_platform

        architecture = vllm_config.model_config.architecture
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"additional_config[{SECTION!r}]: the vLLM plugin prunes {sorted(ARCHITECTURES)} so far; "
                f"{architecture} would run unpruned (remove the section to serve it as it is)"
            )
        if not (current_platform.is_cpu() or current_platform.is_cuda()):
            raise ValueError(
                f"additional_config[{SECTION!r}]: LAR is built for vLLM's CPU attention and FlashAttention, not "
                f"{current_platform.device_name}'s (remove the section to serve the model unpruned)"
            )
        if current_platform.is_cuda():
            logger.warning(
                "era: LAR in vLLM's FlashAttention (era_compile.vllm.flash_attention) is written against "
                "vLLM's API and checked on the CPU path it shares; it has not yet run on a GPU"
            )
        # A request's images leave the processor as one pool item (adapter.py), which vLLM's processor
        # cache, keyed by single images, cannot hand back: it is off, and the pool's own hash serves the
        # encoder and prefix caches.
        vllm_config.model_config.multimodal_config.mm_processor_cache_gb = 0
    setattr(vllm_config.model_config, MODEL_CONFIG_ATTRIBUTE, None if config is None else dataclasses.asdict(config))


def _config_hook(chained: Any) -> type:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class ERAConfigHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            if chained is not None:
                chained.verify_and_update_config(vllm_config)
            bridge_config(vllm_config)

        @staticmethod
        def verify_and_update_model_config(model_config: Any) -> None:
            if chained is not None:
                chained.verify_and_update_model_config(model_config)

    return ERAConfigHook


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    # every architecture: an era section on a model the plugin does not prune is refused, not ignored
    for architecture in sorted(set(ModelRegistry.get_supported_archs()) | set(ARCHITECTURES)):
        previous = MODELS_CONFIG_MAP.get(architecture)
        if getattr(previous, "era_compile_hook", False):
            continue  # registered already in this process
        hook = _config_hook(previous)
        hook.era_compile_hook = True  # type: ignore[attr-defined]
        MODELS_CONFIG_MAP[architecture] = hook
    register_backend(AttentionBackendEnum.CPU_ATTN, "era_compile.vllm.attention.ERACPUAttentionBackend")
    register_backend(AttentionBackendEnum.FLASH_ATTN, "era_compile.vllm.flash_attention.ERAFlashAttentionBackend")
