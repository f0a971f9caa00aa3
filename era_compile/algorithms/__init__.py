"""Pure tensor algorithms: selection strategies, DPP, recycling. Nothing here knows FX.

A *strategy* scores the visual tokens of a sample and picks the ``k`` to keep (the
anchors). Built-in strategies register themselves below; users add their own with
``register_strategy`` and select them by name in ``ERAConfig.strategy``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SelectionInputs:
    """What a strategy may look at, for a batch of samples with ``T`` visual tokens each.

    ``hidden``   [B, T, D]   visual hidden states entering the pruning layer K.
    ``queries``  [B, H, T, d] query states of the visual tokens in the attention of
                 layer K-1 (post-RoPE); for K = 0 layer 0's queries on the unpruned input.
                 Gathered on first use.
    ``saliency`` [B, H, T]   head-wise attention of the instruction queries over the
                 visual keys (ALGORITHMS.md section 1.3), computed on first use.
    ``last_query_attention`` [B, H, T]  the same for the last prompt token alone (FastV),
                 computed on first use.
    """

    hidden: Tensor
    queries_fn: Callable[[], Tensor]
    saliency_fn: Callable[[], Tensor]
    last_query_fn: Callable[[], Tensor] | None = None

    @functools.cached_property
    def queries(self) -> Tensor:
        return self.queries_fn()

    @functools.cached_property
    def saliency(self) -> Tensor:
        return self.saliency_fn()

    @functools.cached_property
    def last_query_attention(self) -> Tensor:
        if self.last_query_fn is None:
            raise ValueError("these selection inputs carry no last-query attention")
        return self.last_query_fn()


@dataclass
class Selection:
    """``anchors`` [B, k] int64, ascending indices into the T visual tokens.

    ``confidence`` [B, T] in [0, 1], or None: how sure the strategy is of each token;
    BTR weighs a recycled token's contribution to its anchor's bias by it (ERA: 1 - entropy).
    None means every recycled token counts 1 (ToMe's size bias).
    """

    anchors: Tensor
    confidence: Tensor | None = None


Strategy = Callable[[SelectionInputs, int, dict], Selection]

_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, fn: Strategy, *, overwrite: bool = False) -> Strategy:
    """Make ``fn(inputs, k, options) -> Selection`` selectable as ``ERAConfig(strategy=name)``."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_strategy: name must be a non-empty string")
    if name in _STRATEGIES and not overwrite:
        raise ValueError(f"register_strategy: {name!r} is already registered (pass overwrite=True)")
    _STRATEGIES[name] = fn
    return fn


def get_strategy(name: str) -> Strategy:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(_STRATEGIES)}") from None


def available_strategies() -> tuple:
    return tuple(_STRATEGIES)


def kept_count(num_visual: int, keep_ratio: float | None = None, keep_tokens: int | None = None) -> int:
    """How many of a sample's ``num_visual`` tokens are kept: ``min(keep_tokens, T)``, else
    ``max(1, round(keep_ratio * T))``; a sample without visual tokens keeps none."""
    if num_visual <= 0:
        return 0
    if keep_tokens is not None:
        return max(1, min(keep_tokens, num_visual))
    if keep_ratio is None:
        raise TypeError("kept_count: give keep_ratio or keep_tokens")
    return max(1, min(num_visual, round(keep_ratio * num_visual)))


def top_k_ascending(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores per row, in ascending order (what a Selection wants):
    [B, T] -> [B, k] int64. The building block of every score-then-keep strategy."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def run_strategy(name: str, inputs: SelectionInputs, k: int, options: dict) -> Selection:
    """Run a strategy and check what it returned, so a bad plug-in fails loudly here."""
    sel = get_strategy(name)(inputs, k, options)
    B, T = inputs.hidden.shape[:2]
    a = sel.anchors
    if not isinstance(a, Tensor) or a.shape != (B, k) or a.dtype != torch.int64:
        raise ValueError(
            f"strategy {name!r} must return anchors int64 [{B}, {k}], got "
            f"{getattr(a, 'dtype', type(a))} {tuple(getattr(a, 'shape', ()))}"
        )
    if k and (a.min() < 0 or a.max() >= T):
        raise ValueError(f"strategy {name!r} returned anchor indices outside [0, {T})")
    if k > 1 and not bool((a[:, 1:] > a[:, :-1]).all()):
        raise ValueError(f"strategy {name!r} must return strictly ascending (sorted, distinct) anchors")
    c = sel.confidence
    if c is not None and c.shape != (B, T):
        raise ValueError(f"strategy {name!r} returned confidence of shape {tuple(c.shape)}, expected [{B}, {T}]")
    return sel


# Built-in strategies register on import.
from era_compile.algorithms import baselines as _baselines  # noqa: E402,F401
from era_compile.algorithms import dep as _dep  # noqa: E402,F401
from era_compile.algorithms import entropyprune as _entropyprune  # noqa: E402,F401
