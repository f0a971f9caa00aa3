"""The plugin's settings: the ``era`` section of vLLM's ``additional_config``, read as an ERAConfig.

Kept free of vLLM imports so that the main suite checks it without a vLLM environment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from era_compile.config import ERAConfig

SECTION = "era"
# ERAConfig fields that choose how era_compile's own torch.compile backend builds its graphs. vLLM
# compiles its model itself and runs its own attention backend, so a value given for one of these
# would change nothing: refused by name rather than silently ignored.
NOT_IN_VLLM = {
    "compiler": "vLLM compiles the model itself (its compilation_config)",
    "attention": "vLLM runs its own attention backend",
    "profile": "a calibration profile picks a layer K > 0, and vLLM prunes at K = 0",
}
WHY_K0 = (
    "the vLLM plugin prunes at K = 0, before the first decoder layer (ERA's own setting): vLLM's "
    "KV-cache manager gives every layer the same slots, so layers before K cannot hold the N tokens "
    "while the layers from K on hold the kept ones"
)


def era_config_from(additional_config: object) -> ERAConfig | None:
    """The ERAConfig of an engine's ``additional_config``, or None when it has no ``era`` section
    (the plugin is inert). Raises ValueError naming the field for anything it cannot honour."""
    if not isinstance(additional_config, Mapping) or SECTION not in additional_config:
        return None
    fields = additional_config[SECTION]
    if not isinstance(fields, Mapping):
        raise ValueError(
            f"additional_config[{SECTION!r}] must be a mapping of ERAConfig fields, got {type(fields).__name__}"
        )
    known = {f.name for f in dataclasses.fields(ERAConfig)}
    for name in fields:
        if name not in known:
            raise ValueError(
                f"additional_config[{SECTION!r}]: unknown field {name!r}; ERAConfig's fields are {sorted(known)}"
            )
        if name in NOT_IN_VLLM:
            raise ValueError(f"additional_config[{SECTION!r}].{name}: not used in vLLM: {NOT_IN_VLLM[name]}")
    layer = fields.get("layer", 0)
    if layer != 0:
        raise ValueError(f"additional_config[{SECTION!r}].layer={layer!r}: only 0 is supported: {WHY_K0}")
    return ERAConfig(**{**dict(fields), "layer": 0})
