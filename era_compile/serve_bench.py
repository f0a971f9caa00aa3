"""A serving user's view of pruning: ``era-compile serve-bench MODEL``.

A seeded stream of requests, each a batch of 1 to ``max_batch`` prompts (left-padded, of mixed
lengths; for Qwen-class models each sample an image of its own size, so batches are ragged and
the stream holds many distinct image sizes), goes through ``generate()`` on three models with
the same weights, request by request interleaved:

* ``eager``: the unpruned model, no compile;
* ``compiled``: the unpruned model under ``torch.compile`` with the same inner compiler;
* ``pruned``: the model compiled with the era backend.

The stream runs twice. The first pass is what a fresh server pays: its wall time, the graphs
each model compiled and their compile seconds (a plain compile too recompiles a small graph of
transformers' per new visual-token count, so nearly every request of a first pass compiles
something). The second pass replays the same requests on the warm models: time to first token
(p50 / p95), decode tokens per second and wall time of a server past its warm-up, and the graphs
it compiled (0 expected). Per model also the peak KV-cache bytes, and for the pruned model the
share of image requests whose prefill pruned, in both passes (which must be 100%).
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from era_compile import zoo
from era_compile.backend import inner_compile, make_era_backend
from era_compile.bench import _sync, device_description
from era_compile.compact_kv import cache_bytes
from era_compile.compat import output_cache
from era_compile.config import ERAConfig
from era_compile.recompiles import recompile_headroom

# Qwen-class grids (t, h, w) in patches; h * w / 4 visual tokens after the 2 x 2 merge
QWEN_GRIDS = [(1, h, w) for h in (4, 6, 8, 10, 12, 14, 16) for w in (4, 6, 8, 10, 12, 14, 16)]
MODELS = ("eager", "compiled", "pruned")


@dataclass
class Request:
    inputs: dict
    batch: int
    visual_tokens: list[int]  # per sample


def check_model(name: str) -> None:
    """serve-bench builds its models from the zoo (a stream needs inputs it can vary)."""
    if name not in zoo.names():
        raise ValueError(f"serve-bench: MODEL must be a zoo model ({', '.join(zoo.names())}), got {name!r}")


def make_stream(name: str, model, *, requests: int, max_batch: int, seed: int) -> list[Request]:
    """The seeded request stream for a zoo model: batch sizes in [1, max_batch], per sample a prompt
    length (and, for Qwen-class models, an image size) of its own."""
    check_model(name)
    if requests < 1 or max_batch < 1:
        raise ValueError(f"serve-bench: --requests and --max-batch must be >= 1, got {requests}, {max_batch}")
    rng = random.Random(seed)
    entry, stream = zoo.ZOO[name], []
    qwen = "grid" in entry.make_inputs.__code__.co_varnames
    for i in range(requests):
        batch = rng.randint(1, max_batch)
        options: dict[str, Any] = dict(seed=seed + i, batch=batch)
        if qwen:
            options["grid"] = [rng.choice(QWEN_GRIDS) for _ in range(batch)]
            options["suffix"] = rng.randint(3, 12)
        elif name in zoo.paddable_names() and batch > 1:
            options["left_pad"] = "spread"
        inputs = entry.make_inputs(model, **options)
        counts = (inputs["input_ids"] == zoo.IMAGE_TOKEN_ID).sum(-1).tolist()
        stream.append(Request(inputs, batch, counts))
    return stream


class _FirstToken(BaseStreamer):
    """Records when generate() produced its first new token (the prompt is put first)."""

    def __init__(self, device: torch.device):
        self.device, self.puts = device, 0
        self.first: float | None = None  # perf_counter() at the first new token

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            _sync(self.device)
            self.first = time.perf_counter()

    def end(self):
        pass


class _Counted:
    """Plain torch.compile's backend (the same inner compiler), counting graphs and compile seconds."""

    def __init__(self, compiler: str):
        self.compiler, self.graphs, self.compile_seconds = compiler, 0, 0.0

    def __call__(self, gm, example_inputs):
        start = time.perf_counter()
        self.graphs += 1
        try:
            return inner_compile(gm, example_inputs, self.compiler)
        finally:
            self.compile_seconds += time.perf_counter() - start


def _serve(model, request: Request, new_tokens: int, device: torch.device) -> dict:
    streamer = _FirstToken(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **request.inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            streamer=streamer,
        )
    _sync(device)
    end = time.perf_counter()
    first = streamer.first if streamer.first is not None else end
    decoded = request.batch * (new_tokens - 1)
    return {
        "wall_s": end - start,
        "ttft_s": first - start,
        "decode_tokens_per_s": decoded / (end - first) if end > first and decoded else None,
        "kv_cache_bytes": cache_bytes(output_cache(out)),
        "tokens": out.sequences[:, -new_tokens:],
    }


def run_serve_bench(
    name: str,
    build: Callable[[], torch.nn.Module],
    *,
    requests: int = 24,
    max_batch: int = 8,
    new_tokens: int = 8,
    seed: int = 0,
    config: ERAConfig | None = None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """The serve-bench record (see the module docstring). ``build()`` gives the model, the same
    weights on every call."""
    with recompile_headroom():  # a stream of prompt shapes through three compiled models of one class
        return _run_serve_bench(
            name,
            build,
            requests=requests,
            max_batch=max_batch,
            new_tokens=new_tokens,
            seed=seed,
            config=config,
            progress=progress,
        )


def _run_serve_bench(
    name: str,
    build: Callable[[], torch.nn.Module],
    *,
    requests: int,
    max_batch: int,
    new_tokens: int,
    seed: int,
    config: ERAConfig | None,
    progress: Callable[[], None] | None,
) -> dict:
    check_model(name)
    config = config or ERAConfig()
    models = {label: build() for label in MODELS}
    device = next(models["eager"].parameters()).device
    stream = make_stream(name, models["eager"], requests=requests, max_batch=max_batch, seed=seed)
    plain, backend = _Counted(config.compiler), make_era_backend(config)
    models["compiled"].compile(backend=plain)
    models["pruned"].compile(backend=backend)
    graphs = {"eager": lambda: 0, "compiled": lambda: plain.graphs, "pruned": lambda: backend.report.graphs}
    passes: dict[str, dict[str, list[dict]]] = {}
    pruned_image_requests = image_requests = agree = 0
    for name_of_pass in ("first", "replay"):
        per_request = passes[name_of_pass] = {label: [] for label in MODELS}
        for request in stream:
            has_image = any(request.visual_tokens)
            image_requests += has_image
            pruned_before = backend.report.pruned_calls
            for label in MODELS:
                before = graphs[label]()
                served = _serve(models[label], request, new_tokens, device)
                served["compiled_graphs"] = graphs[label]() - before
                per_request[label].append(served)
            pruned_image_requests += has_image and backend.report.pruned_calls > pruned_before
            agree += bool(torch.equal(per_request["pruned"][-1]["tokens"], per_request["compiled"][-1]["tokens"]))
            if progress:
                progress()
    compile_seconds = {"eager": 0.0, "compiled": plain.compile_seconds, "pruned": backend.report.compile_seconds}
    summary = {
        label: _summary(passes["first"][label], passes["replay"][label], compile_seconds[label]) for label in MODELS
    }
    for per_request in passes.values():
        for rows in per_request.values():
            for row in rows:
                del row["tokens"]
    import transformers

    record = {
        "model": name,
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": config.to_dict(),
        "requests": requests,
        "max_batch": max_batch,
        "new_tokens": new_tokens,
        "seed": seed,
        "distinct_visual_token_counts": len({t for r in stream for t in r.visual_tokens if t}),
        "batch_sizes": [r.batch for r in stream],
        "visual_tokens": [r.visual_tokens for r in stream],
        "prompt_tokens": [int(r.inputs["input_ids"].shape[1]) for r in stream],
        "image_requests": image_requests,
        "pruned_image_requests": pruned_image_requests,
        "pruned_share": pruned_image_requests / image_requests if image_requests else None,
        "greedy_tokens_equal_to_unpruned": agree / (2 * len(stream)),
        "summary": summary,
        "per_request": passes["first"],
        "replay": passes["replay"],
        "pruned_report": {
            "graphs": backend.report.graphs,
            "pruned_calls": backend.report.pruned_calls,
            "layouts": len(backend.report.pruning),
            "skipped": backend.report.skipped,
            "notes": backend.report.notes,
        },
    }
    del models
    gc.collect()
    return record


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(first: list[dict], replay: list[dict], compile_seconds: float) -> dict:
    """The first pass's cost of warming up, the replay's latency and throughput."""
    ttft = [r["ttft_s"] for r in replay]
    rates = [r["decode_tokens_per_s"] for r in replay if r["decode_tokens_per_s"]]
    return {
        "wall_s": sum(r["wall_s"] for r in first),
        "replay_wall_s": sum(r["wall_s"] for r in replay),
        "ttft_p50_s": _percentile(ttft, 0.5),
        "ttft_p95_s": _percentile(ttft, 0.95),
        "decode_tokens_per_s": statistics.median(rates) if rates else None,
        "graphs_compiled": sum(r["compiled_graphs"] for r in first),
        "compile_seconds": round(compile_seconds, 3),
        "requests_that_compiled": sum(1 for r in first if r["compiled_graphs"]),
        "replay_graphs_compiled": sum(r["compiled_graphs"] for r in replay),
        "peak_kv_cache_bytes": max(r["kv_cache_bytes"] for r in first + replay),
    }


def table(record: dict) -> str:
    """The README table: one row per model."""
    lines = [
        "| model | first pass: wall (s) / graphs / compile (s) | replay: wall (s) / graphs | TTFT p50 / p95 (ms) "
        "| decode tokens/s | peak KV cache |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label in MODELS:
        s = record["summary"][label]
        rate = f"{s['decode_tokens_per_s']:.0f}" if s["decode_tokens_per_s"] else "-"
        lines.append(
            f"| {label} | {s['wall_s']:.1f} / {s['graphs_compiled']} / {s['compile_seconds']:.1f} | "
            f"{s['replay_wall_s']:.1f} / {s['replay_graphs_compiled']} | {1e3 * s['ttft_p50_s']:.1f} / "
            f"{1e3 * s['ttft_p95_s']:.1f} | {rate} | {s['peak_kv_cache_bytes'] / 1e6:.2f} MB |"
        )
    share = record["pruned_share"]
    lines.append(
        f"\n{record['image_requests']} image requests over both passes, {record['pruned_image_requests']} pruned "
        f"({'-' if share is None else f'{100 * share:.0f}%'}); {record['distinct_visual_token_counts']} "
        f"distinct image sizes; batches {min(record['batch_sizes'])}-{max(record['batch_sizes'])}"
    )
    return "\n".join(lines)


def plot(record: dict, stem: str) -> list[str]:
    """Time to first token per request of the three models, and the summary bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in MODELS:
        rows = record["per_request"][label]
        ax.plot(range(len(rows)), [1e3 * r["ttft_s"] for r in rows], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("request")
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(
        f"{record['model']}: {record['requests']} requests, {record['distinct_visual_token_counts']} image sizes",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    for label in MODELS:
        rows = record["replay"][label]
        ax.plot(range(len(rows)), [1e3 * r["ttft_s"] for r in rows], linestyle=":", label=f"{label}, replay")
    summary = record["summary"]
    values = [1e3 * (summary[label]["ttft_p50_s"] or 0) for label in MODELS]
    bars.bar(MODELS, values, color=["gray", "tab:blue", "tab:green"])
    for i, label in enumerate(MODELS):
        bars.annotate(
            f"{summary[label]['graphs_compiled']} graphs\n{summary[label]['compile_seconds']:.0f} s compile",
            (i, values[i]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    bars.set_ylabel("TTFT p50 of the replay (ms)")
    bars.set_title(record["device"], fontsize=8)
    fig.tight_layout()
    path = f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
