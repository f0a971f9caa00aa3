"""Fast greedy MAP inference for a DPP (Chen et al. 2018), ALGORITHMS.md section 2.4."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Floor on the pivot d_j^2 before the square root: round-off can make it slightly
# negative once the kernel's numerical rank is exhausted (section 2.4, [prop]).
PIVOT_FLOOR = 1e-10


def greedy_map_sequence(kernel: Tensor, k: int) -> Tensor:
    """Greedy MAP picks in the order they are made: int64 [..., k] (section 2.4).

    Step t adds ``argmax_i log det L_{Y+i}``, tracked incrementally through the rows
    ``c_i`` of the Cholesky factor and the marginal gains ``d_i^2``. Batched over the
    leading dims of ``kernel`` [..., N, N]; float32, or float64 for a float64 kernel.
    """
    if kernel.dim() < 2 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"greedy_map: kernel must be [..., N, N], got {tuple(kernel.shape)}")
    *batch, n, _ = kernel.shape
    if not 0 <= k <= n:
        raise ValueError(f"greedy_map: need 0 <= k <= N = {n}, got k = {k}")
    dtype = torch.float64 if kernel.dtype == torch.float64 else torch.float32
    num = math.prod(batch)
    picks = torch.empty(num, k, dtype=torch.int64, device=kernel.device)
    if k == 0 or num == 0:
        return picks.reshape(*batch, k)

    lk = kernel.to(dtype).reshape(num, n, n)
    gains = torch.diagonal(lk, dim1=-2, dim2=-1).clone()  # d_i^2 for Y = {}
    factor = lk.new_zeros(num, k, n)  # row t holds e_i of step t: the c_i are its columns
    rows = torch.arange(num, device=kernel.device)
    for t in range(k):
        j = gains.argmax(dim=-1)
        picks[:, t] = j
        c_j = factor[rows, :t, j]  # [num, t]
        overlap = torch.bmm(c_j.unsqueeze(1), factor[:, :t]).squeeze(1)  # <c_j, c_i> for all i
        pivot = gains[rows, j].clamp_min(PIVOT_FLOOR).sqrt()
        e = (lk[rows, j] - overlap) / pivot.unsqueeze(-1)
        factor[:, t] = e
        gains = gains - e * e
        gains[rows, j] = -math.inf  # never pick j again
    return picks.reshape(*batch, k)


def greedy_map(kernel: Tensor, k: int) -> Tensor:
    """Greedy DPP MAP of ``k`` items, int64 [..., k] sorted ascending (section 2.4).

    Sorting restores spatial order, as CDPruner does.
    """
    return greedy_map_sequence(kernel, k).sort(dim=-1).values
