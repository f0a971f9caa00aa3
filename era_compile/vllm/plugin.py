"""The vLLM general plugin (entry point ``vllm.general_plugins``: ``era = era_compile.vllm.plugin:register``).

vLLM calls ``register`` in every process it starts. It registers three things, each inert unless the
engine's ``additional_config`` has an ``era`` section:

* the model class for the architectures the plugin serves (``ARCHITECTURES``), which behaves as vLLM's
  own when ERA is off;
* a config hook for those architectures (vLLM's ``MODELS_CONFIG_MAP``, run once as the engine's
  config is built): it validates the ``era`` section (a bad field stops the engine, named) and puts
  the settings on the ModelConfig, the only config vLLM builds a multimodal processor from;
* the CPU attention backend with LAR (``attention.ERACPUAttentionBackend``) under vLLM's ``CPU_ATTN``
  name; it runs vLLM's kernel unchanged for any layer the model did not mark.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = {"LlavaForConditionalGeneration": "era_compile.vllm.llava:ERALlavaForConditionalGeneration"}


def bridge_config(vllm_config: Any) -> None:
    """Validate ``additional_config['era']`` and hand it to the multimodal processor via the ModelConfig."""
    from era_compile.vllm.config import era_config_from
    from era_compile.vllm.llava import MODEL_CONFIG_ATTRIBUTE

    config = era_config_from(vllm_config.additional_config)
    fields = None if config is None else dataclasses.asdict(config)
    setattr(vllm_config.model_config, MODEL_CONFIG_ATTRIBUTE, fields)


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
        previous = MODELS_CONFIG_MAP.get(architecture)
        if getattr(previous, "era_compile_hook", False):
            continue  # registered already in this process
        hook = _config_hook(previous)
        hook.era_compile_hook = True  # type: ignore[attr-defined]
        MODELS_CONFIG_MAP[architecture] = hook
    register_backend(AttentionBackendEnum.CPU_ATTN, "era_compile.vllm.attention.ERACPUAttentionBackend")
