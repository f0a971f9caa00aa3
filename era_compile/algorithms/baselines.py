"""Baseline strategies for comparison on the same compiled pipeline (ALGORITHMS.md §6.2).

Each picks k anchors and gives no confidence (with ``recycle=True`` every merged token then
counts 1 in its anchor's bias, ToMe's size bias). Recycling and rectification stay orthogonal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from era_compile.algorithms import Selection, SelectionInputs, register_strategy, top_k_ascending


def fastv_strategy(inputs: SelectionInputs, k: int, options: dict) -> Selection:
    """``"fastv"``: the k visual tokens the last prompt token attends to most, head mean, in
    layer K-1's attention (FastV, §6.2), recomputed for that one query row."""
    return Selection(anchors=top_k_ascending(inputs.last_query_attention.mean(dim=1), k))


def farthest_point_selection(x: Tensor, k: int) -> Tensor:
    """Max-min diversity by greedy farthest-point on cosine distance: [B, T, D] -> [B, k] ascending.

    DivPrune (§6.2, [text]: the paper's solver is not public). Start [prop]: the token whose
    nearest other token is farthest (the most isolated one); then repeatedly the token
    farthest from everything chosen. Ties go to the lower index.
    """
    B, T, _ = x.shape
    xn = F.normalize(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), dim=-1)
    distance = 1.0 - xn @ xn.transpose(1, 2)  # [B, T, T]
    isolation = distance + torch.eye(T, dtype=distance.dtype, device=x.device) * 4.0  # exclude self (max 2)
    chosen = [isolation.min(dim=-1).values.argmax(dim=-1)]
    nearest = distance.gather(1, chosen[0].view(B, 1, 1).expand(B, 1, T)).squeeze(1)  # [B, T]
    for _ in range(1, k):
        nearest = nearest.scatter(1, chosen[-1].view(B, 1), -1.0)  # never pick a chosen token again
        nxt = nearest.argmax(dim=-1)
        chosen.append(nxt)
        nearest = torch.minimum(nearest, distance.gather(1, nxt.view(B, 1, 1).expand(B, 1, T)).squeeze(1))
    return torch.stack(chosen, dim=1).sort(dim=-1).values


def divprune_strategy(inputs: SelectionInputs, k: int, options: dict) -> Selection:
    """``"divprune"``: max-min diversity of the visual hidden states entering layer K."""
    return Selection(anchors=farthest_point_selection(inputs.hidden, k))


def random_strategy(inputs: SelectionInputs, k: int, options: dict) -> Selection:
    """``"random"``: k visual tokens uniformly at random, seeded by ``ERAConfig.seed`` (the same
    draw for the same seed and T, on any device)."""
    B, T = inputs.hidden.shape[:2]
    g = torch.Generator().manual_seed(int(options.get("seed", 0)))
    picks = torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(B)])
    return Selection(anchors=picks.sort(dim=-1).values.to(inputs.hidden.device))


register_strategy("fastv", fastv_strategy)
register_strategy("divprune", divprune_strategy)
register_strategy("random", random_strategy)
