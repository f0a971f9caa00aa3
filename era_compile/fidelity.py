"""How much of the model's behaviour survives pruning: ``era-compile fidelity MODEL``.

Against the unpruned model on the same inputs, for four settings (ERA paper, Fig. 1):

* ``unpruned``; ``prune`` (drop the pruned tokens); ``prune+recycle`` (BTR, no bias);
  ``era`` (BTR + LAR).

Measured per setting:

* KL(unpruned || pruned) of the next-token distribution after the prompt;
* top-1 agreement over generated tokens: the unpruned model generates greedily, each setting
  reads the same tokens (teacher forcing) and predicts each next one;
* per decoder layer, the share of attention mass the queries put on **system** keys (before
  the image), **vision** keys (the image's tokens, or the anchors left of them) and
  **instruction** keys (after the image), for two query sets: the last prompt token and the
  instruction tokens (averaged). Recycling keeps the pruned tokens' content and LAR their
  share of the mass: the collapse of the vision share is what it repairs.

The settings run through ``EagerReference``, the hook-based implementation the test suite
holds every compiled graph to (within 1e-4), so the attention probabilities can be read.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from era_compile.config import ERAConfig
from era_compile.reference import EagerReference

SETTINGS: dict[str, dict[str, Any]] = {
    "unpruned": dict(keep_ratio=1.0, recycle=False, rectify=False),
    "prune": dict(recycle=False, rectify=False),
    "prune+recycle": dict(recycle=True, rectify=False),
    "era": dict(recycle=True, rectify=True),
}
GROUPS = ("system", "vision", "instruction")
QUERY_SETS = ("last", "instruction")


class AttentionMass:
    """An ``EagerReference`` observer: per layer and query set, the mean attention mass on each key group."""

    def __init__(self, visual_mask: torch.Tensor):
        positions = torch.arange(visual_mask.shape[1], device=visual_mask.device)
        first = torch.where(visual_mask, positions, visual_mask.shape[1]).min(dim=1).values  # [B]
        last = torch.where(visual_mask, positions, -1).max(dim=1).values
        self.first, self.last_visual = first, last
        self.mass: dict[int, dict[str, list[float]]] = {}

    def __call__(self, layer, query, key, attention_mask, bias, scale, key_positions):
        if query.shape[2] == 1:  # a decode step: not part of this picture
            return
        B, Hq, Lq, _ = query.shape
        key = key.repeat_interleave(Hq // key.shape[1], dim=1).float()
        logits = torch.einsum("bhqd,bhkd->bhqk", query.float(), key) * scale
        if bias is not None:
            logits = logits + bias.float()[:, None, None, :]
        if attention_mask is not None:
            logits = (
                logits.masked_fill(~attention_mask, -math.inf)
                if attention_mask.dtype == torch.bool
                else logits + attention_mask.float()
            )
        else:
            causal = torch.ones(Lq, key.shape[2], dtype=torch.bool, device=query.device).tril(key.shape[2] - Lq)
            logits = logits.masked_fill(~causal, -math.inf)
        probs = torch.nan_to_num(F.softmax(logits, dim=-1)).mean(dim=1)  # [B, Lq, Lk], head mean
        first, last = self.first[:, None], self.last_visual[:, None]
        group = {
            "system": key_positions < first,
            "vision": (key_positions >= first) & (key_positions <= last),
            "instruction": key_positions > last,
        }
        query_positions = key_positions[:, -Lq:]  # prefill: queries are the same tokens as the keys
        rows = {"last": query_positions == query_positions[:, -1:], "instruction": query_positions > last}
        entry = self.mass.setdefault(layer, {})
        for qname, qmask in rows.items():
            per_row = {g: (probs * m[:, None, :].float()).sum(-1) for g, m in group.items()}  # [B, Lq]
            weight = qmask.float()
            entry[qname] = [float((per_row[g] * weight).sum() / weight.sum().clamp_min(1)) for g in GROUPS]


@torch.no_grad()
def fidelity(model, inputs: dict, base: ERAConfig, *, new_tokens: int = 16) -> dict:
    """KL, top-1 agreement and attention-mass shares for every setting of ``SETTINGS``."""
    unpruned = model(**inputs)
    p_ref = F.log_softmax(unpruned.logits[:, -1].float(), dim=-1)
    generated = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    continuation = generated[:, inputs["input_ids"].shape[1] :]
    forced = dict(inputs, input_ids=generated)  # the prompt and the unpruned model's continuation
    if "attention_mask" in inputs:
        forced["attention_mask"] = torch.ones_like(generated)

    results = {}
    for name, changes in SETTINGS.items():
        config = base.replace(keep_tokens=None, **changes) if "keep_ratio" in changes else base.replace(**changes)
        probe = EagerReference(model, config)
        mass = AttentionMass(probe.visual_positions(inputs["input_ids"]))
        probe.attention_observer = mass
        logits = probe(**inputs).logits[:, -1].float()
        kl = F.kl_div(F.log_softmax(logits, -1), p_ref, log_target=True, reduction="batchmean").item()
        probe.attention_observer = None
        predicted = probe(**forced).logits[:, -new_tokens - 1 : -1].argmax(-1)
        agreement = float((predicted == continuation).float().mean())
        results[name] = {
            "kl_next_token": kl,
            "top1_agreement": agreement,
            "attention_mass": {
                str(layer): {q: dict(zip(GROUPS, shares, strict=True)) for q, shares in by_q.items()}
                for layer, by_q in sorted(mass.mass.items())
            },
        }
    return {"settings": results, "new_tokens": new_tokens, "groups": list(GROUPS), "query_sets": list(QUERY_SETS)}


def plot_attention_mass(record: dict, path) -> None:
    """Vision share of the last token's attention per layer, one line per setting (the collapse picture)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GROUPS), figsize=(11, 3.4), sharey=True)
    for ax, group in zip(axes, GROUPS, strict=True):
        for name, result in record["settings"].items():
            layers = sorted(result["attention_mass"], key=int)
            ax.plot(
                [int(layer) for layer in layers],
                [result["attention_mass"][layer]["last"][group] for layer in layers],
                marker="o",
                label=name,
            )
        ax.set_title(f"{group} keys", fontsize=9)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylabel("share of the last token's attention")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
