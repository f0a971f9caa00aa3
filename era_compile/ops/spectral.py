"""``era::head_gram_eigvalsh``: EntropyPrune's dual-Gram eigenvalues as an op a compiled graph can hold.

Inductor does not lower ``torch.linalg.eigvalsh``; behind a custom op with a fake kernel the
batched float64 eigensolve stays one opaque node (no graph break). The strategy itself already
runs inside ``era::select``; this op is for user code and calibration graphs.

    eig = torch.ops.era.head_gram_eigvalsh(m)     # m [..., H, d] -> [..., H] float64, ascending
"""

from __future__ import annotations

import torch
from torch import Tensor

from era_compile.algorithms.entropyprune import head_gram_eigenvalues


@torch.library.custom_op("era::head_gram_eigvalsh", mutates_args=())
def head_gram_eigvalsh(m: Tensor) -> Tensor:
    if m.dim() < 2:
        raise ValueError(f"head_gram_eigvalsh: expected [..., H, d], got {tuple(m.shape)}")
    return head_gram_eigenvalues(m)


@head_gram_eigvalsh.register_fake
def _(m):
    if m.dim() < 2:
        raise ValueError(f"head_gram_eigvalsh: expected [..., H, d], got {tuple(m.shape)}")
    return m.new_empty(m.shape[:-1], dtype=torch.float64)
