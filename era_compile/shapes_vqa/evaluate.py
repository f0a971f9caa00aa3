"""Accuracy against kept visual tokens: ``era-compile eval shapes-vqa``.

The trained shapes-VQA model answers the first ``questions`` test questions unpruned (eager),
then through the era backend for every strategy, setting and keep ratio:

    setting  "prune"     drop the pruned tokens (recycle=False, rectify=False)
             "recycle"   + BTR: fold them into their anchors (recycle=True, rectify=False)
             "era"       + LAR: the anchors' log-count bias (recycle=True, rectify=True)

Each (strategy, setting) is compiled once, afresh (``torch._dynamo.reset``), with strict mode
on, so a configuration that would run unpruned fails loudly instead of scoring as the unpruned
model; its keep ratios then run through the same compiled graphs (``EraBackend.budget``: the
budget is a graph input). The record counts the graphs each (strategy, setting) compiled, and
checks that a new ratio compiled none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from era_compile.backend import make_era_backend
from era_compile.config import ERAConfig
from era_compile.shapes_vqa import task
from era_compile.shapes_vqa.model import NUM_VISUAL, score

STRATEGIES = ("era", "entropyprune", "fastv", "divprune", "random")
SETTINGS = {"prune": (False, False), "recycle": (True, False), "era": (True, True)}
TITLES = {"prune": "pruning only", "recycle": "+ recycling (BTR)", "era": "+ rectification (BTR + LAR)"}
KEEP_RATIOS = (0.5, 0.25, 0.11, 0.05)


def kept_tokens(ratio: float) -> int:
    return max(1, round(ratio * NUM_VISUAL))


def run_eval(
    model,
    tokenizer,
    *,
    questions: int = 1000,
    layer: int = 2,
    strategies: Sequence[str] = STRATEGIES,
    settings: Sequence[str] = tuple(SETTINGS),
    ratios: Sequence[float] = KEEP_RATIOS,
    compiler: str = "eager",
    batch: int = 100,
    progress: Callable[[], None] | None = None,
) -> dict:
    """The eval record: unpruned accuracy, and one entry per (strategy, setting, keep ratio)."""
    for name in settings:
        if name not in SETTINGS:
            raise ValueError(f"setting must be one of {list(SETTINGS)}, got {name!r}")
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    started = time.time()
    data = task.samples("test", 0, questions)
    unpruned = score(model, data, tokenizer, batch)
    if progress:
        progress()
    results: list[dict] = []
    compiles: list[dict] = []
    for strategy in strategies:
        for setting in settings:
            recycle, rectify = SETTINGS[setting]
            config = ERAConfig(
                layer=layer,
                keep_ratio=None,
                keep_tokens=kept_tokens(ratios[0]),
                strategy=strategy,
                recycle=recycle,
                rectify=rectify,
                compiler=compiler,
                strict=True,
            )
            torch._dynamo.reset()
            backend = make_era_backend(config)
            compiled = torch.compile(model, backend=backend, dynamic=False)
            start, after_first = time.perf_counter(), None
            for ratio in ratios:
                with backend.budget(keep_tokens=kept_tokens(ratio)):
                    scores = score(compiled, data, tokenizer, batch)
                after_first = backend.report.graphs if after_first is None else after_first
                if backend.report.graphs != after_first:
                    raise RuntimeError(
                        f"{strategy} / {setting}: keep ratio {ratio} compiled "
                        f"{backend.report.graphs - after_first} new graph(s); the budget should be "
                        "an input of the compiled graphs"
                    )
                site = backend.report.pruning[-1]
                results.append(
                    {
                        "strategy": strategy,
                        "setting": setting,
                        "keep_ratio": ratio,
                        "kept": site.kept,
                        "accuracy": scores,
                    }
                )
                if progress:
                    progress()
            compiles.append(
                {
                    "strategy": strategy,
                    "setting": setting,
                    "graphs": backend.report.graphs,
                    "compile_seconds": round(backend.report.compile_seconds, 2),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
    torch._dynamo.reset()
    import transformers

    return {
        "questions": questions,
        "layer": layer,
        "visual_tokens": NUM_VISUAL,
        "compiler": compiler,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds": round(time.time() - started, 1),
        "unpruned": unpruned,
        "results": results,
        "compiles": compiles,
    }


def table(record: dict) -> str:
    """Accuracy (%) per method (rows) and kept tokens (columns), unpruned first."""
    ratios = sorted({r["keep_ratio"] for r in record["results"]}, reverse=True)
    kept = {r["keep_ratio"]: r["kept"] for r in record["results"]}
    head = "| method | " + " | ".join(f"{kept[r]} ({100 * r:g}%)" for r in ratios) + " |"
    lines = [head, "|" + " --- |" * (len(ratios) + 1)]
    lines.append(
        f"| unpruned ({record['visual_tokens']}) | "
        + " | ".join(f"{100 * record['unpruned']['all']:.1f}" for _ in ratios)
        + " |"
    )
    methods = list(dict.fromkeys((r["strategy"], r["setting"]) for r in record["results"]))
    for strategy, setting in methods:
        acc = {
            r["keep_ratio"]: r["accuracy"]["all"]
            for r in record["results"]
            if (r["strategy"], r["setting"]) == (strategy, setting)
        }
        lines.append(f"| {strategy} / {setting} | " + " | ".join(f"{100 * acc[r]:.1f}" for r in ratios) + " |")
    return "\n".join(lines)


def plot(record: dict, path: str) -> list[str]:
    """Accuracy vs kept tokens, one panel per setting, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in record["results"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for strategy in dict.fromkeys(r["strategy"] for r in record["results"]):
            rows = sorted(
                (r for r in record["results"] if (r["strategy"], r["setting"]) == (strategy, setting)),
                key=lambda r: r["kept"],
            )
            ax.plot([r["kept"] for r in rows], [100 * r["accuracy"]["all"] for r in rows], marker="o", label=strategy)
        ax.axhline(100 * record["unpruned"]["all"], color="black", linestyle="--", label="unpruned")
        kept = sorted({r["kept"] for r in record["results"]})
        ax.set_xscale("log")
        ax.set_xticks(kept, [str(k) for k in kept])
        ax.minorticks_off()
        ax.set_xlabel(f"visual tokens kept (of {record['visual_tokens']})")
        ax.set_title(TITLES[setting])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy (%), {record['questions']} test questions")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(
        f"shapes-VQA: pruning at layer {record['layer']}, unpruned {100 * record['unpruned']['all']:.1f}%", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
