"""A request's images as one pool, laid out in a prompt whose length vLLM fixes before the pool is scored.

ERA's budget is per request: k = kept(T_1 + ... + T_m) tokens are chosen jointly over all the
request's images, so how many of image i's tokens survive (k_i) is known only after the vision tower
and layer 0 have run. vLLM, though, fixes a prompt's length, and so its scheduling and KV blocks, when
the request is processed. The served prompt therefore gives image i ``min(T_i, k)`` slots, the most
it can keep: its anchors fill the first k_i slots in their original order and the rest are *dead*
slots, whose keys carry a ``log b`` so low (``DEAD_SLOT_LOG_BIAS``) that no query gives them weight in
any layer. With one image there is no dead slot (``min(T, k) = k``). What dead slots cost is stated in
docs/vllm.md ("One pool").

Free of vLLM: the processor (adapter.py) applies the layout, the model fills it, the tests check it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from era_compile.config import ERAConfig

# exp(-2000) is 0 in fp32 and bf16, and -2000 * sqrt(head size) stays finite in the fp16 KV cache
# the bias is stored in (attention.py divides log b by the softmax scale): no inf - inf in a kernel.
DEAD_SLOT_LOG_BIAS = -2000.0


@dataclass(frozen=True)
class PoolLayout:
    """One request's images in its unpruned prompt (``starts``, ``counts``: each image's first token
    and its T_i tokens) and in the prompt vLLM serves (``slot_starts``, ``slots``)."""

    unpruned: tuple[int, ...]
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    kept: int
    slots: tuple[int, ...]
    slot_starts: tuple[int, ...]

    def served_prompt(self) -> list[int]:
        """The unpruned prompt with each image cut to its slots."""
        out: list[int] = []
        cursor = 0
        for start, count, slots in zip(self.starts, self.counts, self.slots, strict=True):
            out += self.unpruned[cursor : start + slots]
            cursor = start + count
        return out + list(self.unpruned[cursor:])

    def embed_mask(self) -> list[bool]:
        """Which tokens from the first slot to the last are the pool's (the text between images is not)."""
        first = self.slot_starts[0]
        mask = [False] * (self.slot_starts[-1] + self.slots[-1] - first)
        for start, slots in zip(self.slot_starts, self.slots, strict=True):
            mask[start - first : start - first + slots] = [True] * slots
        return mask


def plan_pool(prompt: Sequence[int], spans: Sequence[tuple[int, int]], config: ERAConfig) -> PoolLayout:
    """The layout of ``prompt`` (unpruned token ids) whose images fill ``spans`` ((offset, length) each,
    in prompt order) under ``config``'s budget."""
    if not spans:
        raise ValueError("era: a pool needs at least one image")
    starts, counts = tuple(int(s) for s, _ in spans), tuple(int(n) for _, n in spans)
    for (start, count), following in zip(spans, [*starts[1:], len(prompt)], strict=True):
        if count <= 0 or start < 0 or start + count > following:
            raise ValueError(f"era: image spans {list(spans)} overlap or leave a prompt of {len(prompt)} tokens")
        if len(set(prompt[start : start + count])) != 1:
            raise ValueError(f"era: the image at token {start} is not one repeated placeholder token")
    kept = config.kept(sum(counts))
    slots = tuple(min(count, kept) for count in counts)
    slot_starts, removed = [], 0
    for start, count, slot in zip(starts, counts, slots, strict=True):
        slot_starts.append(start - removed)
        removed += count - slot
    return PoolLayout(tuple(int(t) for t in prompt), starts, counts, kept, slots, tuple(slot_starts))


def pool_capacity(config: ERAConfig, largest_image: int, images: int, longest_prompt: int) -> int:
    """The most slots one request's pool can hold: ``images`` images of ``largest_image`` tokens each
    (each image's slots, min(T_i, k), grow with T_i and k, so equal images at the largest size bound
    it), and never more than the longest prompt the engine takes (vLLM's default image limit is 999)."""
    return min(longest_prompt, images * min(largest_image, config.kept(images * largest_image)))


# Positions ride beside their rows in the model's dtype, whose mantissa holds integers exactly only up
# to 256 (bf16) or 2048 (fp16): each goes as two digits of base 256, exact in either up to 65535.
POSITION_BASE = 256


def pack_positions(positions: Tensor, dtype: torch.dtype) -> Tensor:
    """[k, P] integer positions as [k, 2P] columns of ``dtype``: high digits, then low."""
    if positions.numel() and int(positions.max()) >= POSITION_BASE**2:
        raise ValueError(f"era: position {int(positions.max())} is past what a kept row can carry")
    return torch.cat([positions // POSITION_BASE, positions % POSITION_BASE], dim=-1).to(dtype)


def unpack_positions(columns: Tensor) -> Tensor:
    """``pack_positions``'s columns [k, 2P] back to [k, P] integers."""
    high, low = columns.round().long().chunk(2, dim=-1)
    return high * POSITION_BASE + low
