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
    if k == 0 or num == 0:
        return torch.empty(*batch, k, dtype=torch.int64, device=kernel.device)

    lk = kernel.to(dtype).reshape(num, n, n)
    gains = torch.diagonal(lk, dim1=-2, dim2=-1).clone()  # d_i^2 for Y = {}
    factor = lk.new_zeros(num, k, n)  # row t holds e_i of step t: the c_i are its columns
    chosen = []
    # few, batched ops per step: the loop is sequential, so per-op overhead is its cost
    for t in range(k):
        j = gains.argmax(dim=-1, keepdim=True)  # [num, 1]
        chosen.append(j)
        row = lk.gather(1, j.unsqueeze(-1).expand(num, 1, n)).squeeze(1)  # L[j, :]
        if t:
            c_j = factor[:, :t].gather(2, j.unsqueeze(1).expand(num, t, 1))  # [num, t, 1]
            row = row - torch.bmm(c_j.transpose(1, 2), factor[:, :t]).squeeze(1)  # - <c_j, c_i>
        e = row / gains.gather(1, j).clamp_min(PIVOT_FLOOR).sqrt()
        factor[:, t] = e
        gains = gains.addcmul(e, e, value=-1.0).scatter(1, j, -math.inf)  # never pick j again
    picks = torch.cat(chosen, dim=1)
    return picks.reshape(*batch, k)


def greedy_map(kernel: Tensor, k: int) -> Tensor:
    """Greedy DPP MAP of ``k`` items, int64 [..., k] sorted ascending (section 2.4).

    Sorting restores spatial order, as CDPruner does.
    """
    return greedy_map_sequence(kernel, k).sort(dim=-1).values
