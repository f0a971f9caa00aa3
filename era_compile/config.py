"""ERAConfig: every knob of the backend, validated once, hashed into the compile cache key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeGuard

from era_compile.ops.attention import KERNELS as ATTENTION_KERNELS

COMPILERS = ("inductor", "eager")
WEIGHT_NORMS = ("mean", "none", "max")
DEFAULT_KEEP_RATIO = 0.25
# layer="auto" with no calibration profile: EntropyPrune's shipped K for LLaVA-1.5/NeXT
# (ALGORITHMS.md §2.2); the report says this default was used.
AUTO_LAYER_DEFAULT = 2


@dataclass(frozen=True)
class ERAConfig:
    """What to prune, where, and how the pruned model attends.

    Budget: give exactly one of ``keep_ratio`` (share of the visual tokens kept,
    ``k = max(1, round(ratio * T))``) or ``keep_tokens`` (``k = min(keep_tokens, T)``);
    with neither, ``keep_ratio=0.25``. ``keep_ratio=1.0`` keeps every visual token.
    """

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    layer: int | str = 2
    profile: str | None = None
    strategy: str = "era"
    recycle: bool = True
    rectify: bool = True
    dep_lambda: float = 1.0
    dep_beta: float = 0.5
    weight_norm: str = "mean"
    trace_normalize: bool = False
    attention: str = "auto"
    compiler: str = "inductor"
    strict: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.keep_tokens is not None:
            if self.keep_ratio is not None:
                _fail("keep_tokens", "give keep_ratio or keep_tokens, not both")
            if not _is_int(self.keep_tokens) or self.keep_tokens < 1:
                _fail("keep_tokens", f"must be an int >= 1, got {self.keep_tokens!r}")
        else:
            if self.keep_ratio is None:
                object.__setattr__(self, "keep_ratio", DEFAULT_KEEP_RATIO)
            r = self.keep_ratio
            if not _is_number(r) or not (0.0 < r <= 1.0):
                _fail("keep_ratio", f"must be a number in (0, 1], got {r!r}")
        if self.layer != "auto" and (not _is_int(self.layer) or self.layer < 0):
            _fail("layer", f"must be an int >= 0 or 'auto', got {self.layer!r}")
        if self.profile is not None:
            if self.layer != "auto":
                _fail("profile", "a calibration profile only applies with layer='auto'")
            _read_profile(self.profile)
        from era_compile.algorithms import available_strategies

        if self.strategy not in available_strategies():
            _fail("strategy", f"unknown strategy {self.strategy!r}; known: {sorted(available_strategies())}")
        for name in ("recycle", "rectify", "strict", "trace_normalize"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be a bool, got {getattr(self, name)!r}")
        if not _is_number(self.dep_lambda) or self.dep_lambda < 0 or not math.isfinite(self.dep_lambda):
            _fail("dep_lambda", f"must be a finite number >= 0, got {self.dep_lambda!r}")
        if not _is_number(self.dep_beta) or not (0.0 <= self.dep_beta <= 1.0):
            _fail("dep_beta", f"must be a number in [0, 1], got {self.dep_beta!r}")
        _check_choice("weight_norm", self.weight_norm, WEIGHT_NORMS)
        _check_choice("attention", self.attention, ATTENTION_KERNELS)
        _check_choice("compiler", self.compiler, COMPILERS)
        if not _is_int(self.seed):
            _fail("seed", f"must be an int, got {self.seed!r}")

    def kept(self, num_visual: int) -> int:
        """Visual tokens kept out of a sample's ``num_visual``: a function of the count alone."""
        from era_compile.algorithms import kept_count

        return kept_count(num_visual, self.keep_ratio, self.keep_tokens)

    def strategy_options(self) -> dict:
        """The knobs a selection strategy receives (JSON-able, so they can ride in an op's schema)."""
        return {
            "lam": float(self.dep_lambda),
            "beta": float(self.dep_beta),
            "seed": int(self.seed),
            "trace_normalize": bool(self.trace_normalize),
        }

    def resolve_layer(self) -> tuple[int, str | None]:
        """K as an int, and for ``layer="auto"`` a note on where it came from (for the report)."""
        if isinstance(self.layer, int):  # validated: an int, or "auto"
            return self.layer, None
        if self.profile is None:
            return AUTO_LAYER_DEFAULT, (
                f"layer='auto' without a calibration profile: K={AUTO_LAYER_DEFAULT}, the "
                "documented default (run `era-compile calibrate` for this model's own)"
            )
        profile = _read_profile(self.profile)
        return profile["layer"], (
            f"layer='auto': K={profile['layer']}, the Entropy Collapse Layer in profile "
            f"{self.profile} ({profile.get('model', 'model not named')})"
        )

    @property
    def resolved_layer(self) -> int:
        """K of a config whose ``layer`` is resolved (the backend's own: ``resolve_layer`` turns "auto" into K)."""
        if not isinstance(self.layer, int):
            raise ValueError(f"ERAConfig.layer={self.layer!r} is not resolved: ERAConfig.resolve_layer() gives K")
        return self.layer

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cache_key(self) -> str:
        """A short stable digest; two configs never share a compiled graph."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes) -> ERAConfig:
        return dataclasses.replace(self, **changes)


def keep_tokens_for_layer_average(avg_tokens: float, num_visual: int, layer: int, num_layers: int) -> int:
    """The "average visual tokens over layers" budget of FastV / PyramidDrop / EntropyPrune
    (ALGORITHMS.md §2.2): layers < K hold all T tokens, layers >= K hold k, and the mean over
    the L layers is ``avg``: ``k = floor((L·avg - K·T) / (L - K))``. For ``keep_tokens``."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    k = math.floor((num_layers * avg_tokens - layer * num_visual) / (num_layers - layer))
    if k < 1:
        raise ValueError(
            f"an average of {avg_tokens} tokens over {num_layers} layers cannot be met when the first "
            f"{layer} layers hold all {num_visual}: lower the layer or raise the average"
        )
    return min(k, num_visual)


def _read_profile(path: str) -> dict:
    """A calibration profile written by ``era-compile calibrate``, checked."""
    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        _fail("profile", f"cannot read calibration profile {path!r}: {e}")
    if not isinstance(profile, dict) or not _is_int(profile.get("layer")) or profile["layer"] < 0:
        _fail("profile", f"{path!r} is not a calibration profile (no integer 'layer')")
    return profile


def _fail(field: str, why: str) -> NoReturn:
    raise ValueError(f"ERAConfig.{field}: {why}")


def _check_choice(field: str, value: object, choices: tuple) -> None:
    if value not in choices:
        _fail(field, f"must be one of {list(choices)}, got {value!r}")


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))
