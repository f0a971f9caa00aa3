"""A serving user's view of pruning: ``era-compile serve-bench MODEL``.

A seeded stream of requests, each a batch of 1 to ``max_batch`` prompts (left-padded, of mixed
lengths; for Qwen-class models each sample an image of its own size, so batches are ragged and
the stream holds many distinct image sizes), goes through ``generate()`` on three models with
the same weights, request by request interleaved:

* ``eager``: the unpruned model, no compile;
* ``compiled``: the unpruned model under ``torch.compile`` with the same inner compiler;
* ``pruned``: the model compiled with the era backend.

The stream runs ``1 + replays`` times. The first pass is what a fresh server pays: its wall time, the graphs
each model compiled and their compile seconds (a plain compile too recompiles a small graph of
transformers' per new visual-token count, so nearly every request of a first pass compiles
something). The later passes replay the same requests on the warm models (each request's row of
the record's ``replay`` is, per model, the replay of median time to first token): time to first token
(p50 / p95), decode tokens per second and wall time of a server past its warm-up, and the graphs
it compiled (0 expected). Per model also the peak KV-cache bytes, and for the pruned model the
share of image requests whose prefill pruned, in every pass (which must be 100%).

Beside them, per request, the **ideal**: what a pruner that costs nothing would reach on this
machine, the compiled unpruned model whose layers from K on run on the kept tokens alone. Its
time to first token is the compiled model's, less ``(L-K)/L`` of what the language model saves on
the kept tokens: the compiled model's prefill on a text-only batch of each sample's real length
``L_b`` less the one on a text-only batch of its kept length ``n'_b = L_b - T_b + k_b`` (both
left-padded as the batches are; the layers are equal, the LM head reads the last position only).
Everything else of an image prompt (the vision tower, the positions, the merge, the first K
layers) costs the ideal what it costs the compiled model.
``ideal_share`` is the ideal's speed-up that the pruned model reaches: (compiled / pruned) over
(compiled / ideal), i.e. ideal time over pruned time. In the replay, one prefill more per
request times ``era::select`` and ``era::recycle`` within it (``bench.selection_overhead``):
their seconds and share (``selection``). The benchmark models (``zoo`` entries marked
``benchmark``, the text-model widths) leave the eager model out: it costs the stream's time and
says nothing about pruning.
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
from era_compile.bench import (
    _generate,
    _sync,
    device_description,
    kept_lengths_of,
    kept_text_prompt,
    prompt_lengths,
    selection_overhead,
    timed,
)
from era_compile.compact_kv import cache_bytes
from era_compile.compat import output_cache
from era_compile.config import ERAConfig
from era_compile.recompiles import recompile_headroom

# Qwen-class grids (t, h, w) in patches; h * w / 4 visual tokens after the 2 x 2 merge
QWEN_GRIDS = [(1, h, w) for h in (4, 6, 8, 10, 12, 14, 16) for w in (4, 6, 8, 10, 12, 14, 16)]
# the traffic model's: 64 to 1,024 visual tokens, as real image sizes give
SERVE_GRIDS = [(1, h, w) for h in (16, 24, 32, 40, 48, 56, 64) for w in (16, 24, 32, 40, 48, 56, 64)]
GRIDS = {"qwen2-vl-serve": SERVE_GRIDS}
MODELS = ("eager", "compiled", "pruned")


def models_of(name: str) -> tuple[str, ...]:
    """The models a stream runs through: a benchmark model leaves eager out (see the docstring)."""
    return MODELS[1:] if zoo.ZOO[name].benchmark else MODELS


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
            options["grid"] = [rng.choice(GRIDS.get(name, QWEN_GRIDS)) for _ in range(batch)]
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


class _Ideal:
    """Each request's ideal on the compiled unpruned model (see the module docstring)."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        text = model.config.get_text_config()
        self.pad, self.vocab, self.layers = text.pad_token_id or 0, text.vocab_size, text.num_hidden_layers

    def __call__(self, request: Request, entry, compiled_ttft: float) -> dict:
        kept_lengths = kept_lengths_of(request.inputs, entry)
        kept = kept_text_prompt(request.inputs, kept_lengths, self.pad, self.vocab)
        full = kept_text_prompt(request.inputs, prompt_lengths(request.inputs), self.pad, self.vocab)
        text_full = timed(lambda: _generate(self.model, full, 1), self.device)
        text_kept = timed(lambda: _generate(self.model, kept, 1), self.device)
        after = 1 - entry.layer / self.layers
        return {
            "ttft_s": compiled_ttft - after * (text_full - text_kept),
            "text_full_s": text_full,
            "text_kept_s": text_kept,
            "kept_lengths": kept_lengths,
        }


def _layout(entry) -> dict:
    """What the pruned prefill of a request ran on: N, n' and what n' had been with the padding."""
    return {"N": entry.seq_len_before, "kept_len": entry.seq_len_after, "padded_kept_len": entry.seq_len_padded}


def _entry_of_call(report, calls_before: list[int]):
    """The report's layout entry that the last call counted (a new one, or one whose calls grew)."""
    grown = [p for p, n in zip(report.pruning, calls_before, strict=False) if p.calls > n]
    return (grown or report.pruning[len(calls_before) :] or [None])[0]


def run_serve_bench(
    name: str,
    build: Callable[[], torch.nn.Module],
    *,
    requests: int = 24,
    max_batch: int = 8,
    new_tokens: int = 8,
    seed: int = 0,
    replays: int = 1,
    config: ERAConfig | None = None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """The serve-bench record (see the module docstring). ``build()`` gives the model, the same
    weights on every call."""
    if replays < 1:
        raise ValueError(f"serve-bench: --replays must be >= 1, got {replays}")
    with recompile_headroom():  # a stream of prompt shapes through three compiled models of one class
        return _run_serve_bench(
            name,
            build,
            requests=requests,
            max_batch=max_batch,
            new_tokens=new_tokens,
            seed=seed,
            replays=replays,
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
    replays: int,
    config: ERAConfig | None,
    progress: Callable[[], None] | None,
) -> dict:
    check_model(name)
    config = config or ERAConfig()
    labels = models_of(name)
    models = {label: build() for label in labels}
    device = next(models["compiled"].parameters()).device
    stream = make_stream(name, models["compiled"], requests=requests, max_batch=max_batch, seed=seed)
    plain, backend = _Counted(config.compiler), make_era_backend(config)
    models["compiled"].compile(backend=plain)
    models["pruned"].compile(backend=backend)
    # the ideal's text-only prompts run on a compiled model of their own: its compiles are not the compiled row's
    text_only = build()
    text_only.compile(backend=_Counted(config.compiler))
    ideal = _Ideal(text_only, device)
    graphs = {"eager": lambda: 0, "compiled": lambda: plain.graphs, "pruned": lambda: backend.report.graphs}
    passes: dict[str, dict[str, list[Any]]] = {}  # per pass and row, each request's record (None: no ideal)
    pruned_image_requests = image_requests = agree = 0
    names_of_passes = ("first", *(f"replay {r + 1}" for r in range(replays)))
    for name_of_pass in names_of_passes:
        per_request = passes[name_of_pass] = {label: [] for label in (*labels, "ideal")}
        for request in stream:
            has_image = any(request.visual_tokens)
            image_requests += has_image
            calls_before = [p.calls for p in backend.report.pruning]
            for label in labels:
                before = graphs[label]()
                served = _serve(models[label], request, new_tokens, device)
                served["compiled_graphs"] = graphs[label]() - before
                per_request[label].append(served)
            entry = _entry_of_call(backend.report, calls_before)
            pruned_image_requests += has_image and entry is not None
            if entry is not None:
                per_request["pruned"][-1]["layout"] = _layout(entry)
            per_request["ideal"].append(
                ideal(request, entry, per_request["compiled"][-1]["ttft_s"]) if entry is not None else None
            )
            if name_of_pass != "first" and entry is not None:  # a prefill more: era::select and recycle timed
                per_request["pruned"][-1]["selection"] = selection_overhead(models["pruned"], request.inputs)
            agree += bool(torch.equal(per_request["pruned"][-1]["tokens"], per_request["compiled"][-1]["tokens"]))
            if progress:
                progress()
    for per_request in passes.values():
        for label in labels:
            for row in per_request[label]:
                del row["tokens"]
    replays_run = [passes[n] for n in names_of_passes[1:]]
    replay = _median_replay(replays_run, (*labels, "ideal"))
    compile_seconds = {"eager": 0.0, "compiled": plain.compile_seconds, "pruned": backend.report.compile_seconds}
    summary = {label: _summary(passes["first"][label], replay[label], compile_seconds[label]) for label in labels}
    import transformers

    record = {
        "model": name,
        "models": list(labels),
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": config.to_dict(),
        "requests": requests,
        "max_batch": max_batch,
        "new_tokens": new_tokens,
        "seed": seed,
        "replays": replays,
        "distinct_visual_token_counts": len({t for r in stream for t in r.visual_tokens if t}),
        "batch_sizes": [r.batch for r in stream],
        "visual_tokens": [r.visual_tokens for r in stream],
        "prompt_tokens": [int(r.inputs["input_ids"].shape[1]) for r in stream],
        "image_requests": image_requests,
        "pruned_image_requests": pruned_image_requests,
        "pruned_share": pruned_image_requests / image_requests if image_requests else None,
        "greedy_tokens_equal_to_unpruned": agree / (len(names_of_passes) * len(stream)),
        "summary": summary,
        "ideal": _ideal_summary(replay),
        "per_request": passes["first"],
        "replay": replay,
        "replay_ttft_s": {
            label: [[p[label][i] and p[label][i]["ttft_s"] for p in replays_run] for i in range(len(stream))]
            for label in (*labels, "ideal")
        },
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


def _median_replay(replays: list[dict[str, list]], labels: tuple[str, ...]) -> dict[str, list]:
    """Per model and request, the replay of median time to first token (the lower median of an even
    count): a whole run, so its fields (TTFT, selection, layout) belong together."""
    median: dict[str, list] = {}
    for label in labels:
        rows = []
        for runs in zip(*(r[label] for r in replays), strict=True):
            timed_runs = sorted((run for run in runs if run is not None), key=lambda run: run["ttft_s"])
            rows.append(timed_runs[(len(timed_runs) - 1) // 2] if timed_runs else None)
        median[label] = rows
    return median


def _ideal_summary(replay: dict[str, list]) -> dict:
    """The replay's prefill against the ideal: TTFT percentiles, the stream's speed-ups over the
    compiled model (sums of TTFT over the requests the ideal covers) and ``ideal_share``."""
    rows = [i for i, r in enumerate(replay["ideal"]) if r is not None]
    if not rows:
        return {"ttft_p50_s": None, "ttft_p95_s": None, "prefill_speedup": None, "ideal_share": None}
    total = {label: sum(replay[label][i]["ttft_s"] for i in rows) for label in ("compiled", "pruned", "ideal")}
    return {
        "ttft_p50_s": _percentile([replay["ideal"][i]["ttft_s"] for i in rows], 0.5),
        "ttft_p95_s": _percentile([replay["ideal"][i]["ttft_s"] for i in rows], 0.95),
        "prefill_speedup": {
            "pruned": total["compiled"] / total["pruned"],
            "ideal": total["compiled"] / total["ideal"],
        },
        "ideal_share": total["ideal"] / total["pruned"],
    }


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
    """The README table: one row per model, the ideal's row, and the stream's prefill speed-ups."""
    lines = [
        "| model | first pass: wall (s) / graphs / compile (s) | replay: wall (s) / graphs | TTFT p50 / p95 (ms) "
        "| decode tokens/s | peak KV cache |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label in record["models"]:
        s = record["summary"][label]
        rate = f"{s['decode_tokens_per_s']:.0f}" if s["decode_tokens_per_s"] else "-"
        lines.append(
            f"| {label} | {s['wall_s']:.1f} / {s['graphs_compiled']} / {s['compile_seconds']:.1f} | "
            f"{s['replay_wall_s']:.1f} / {s['replay_graphs_compiled']} | {1e3 * s['ttft_p50_s']:.1f} / "
            f"{1e3 * s['ttft_p95_s']:.1f} | {rate} | {s['peak_kv_cache_bytes'] / 1e6:.2f} MB |"
        )
    ideal = record["ideal"]
    if ideal["ttft_p50_s"] is not None:
        lines.append(f"| ideal | - | - | {1e3 * ideal['ttft_p50_s']:.1f} / {1e3 * ideal['ttft_p95_s']:.1f} | - | - |")
    share = record["pruned_share"]
    lines.append(
        f"\n{record['image_requests']} image requests over all {1 + record.get('replays', 1)} passes, "
        f"{record['pruned_image_requests']} pruned "
        f"({'-' if share is None else f'{100 * share:.0f}%'}); {record['distinct_visual_token_counts']} "
        f"distinct image sizes; batches {min(record['batch_sizes'])}-{max(record['batch_sizes'])}"
    )
    if ideal["prefill_speedup"] is not None:
        speedup = ideal["prefill_speedup"]
        lines.append(
            f"the replay's prefill over the compiled model: pruned {speedup['pruned']:.2f}x, ideal "
            f"{speedup['ideal']:.2f}x ({100 * ideal['ideal_share']:.0f}% of the ideal's speed-up)"
        )
    return "\n".join(lines)


def request_table(record: dict) -> str:
    """Per request of the replay: its samples, N -> n' (and n' had the padding stayed), the time to
    first token of the compiled, pruned and ideal models, the two speed-ups, and the share of the
    pruned prefill in era::select and era::recycle."""
    lines = [
        "| request | T per sample | N | n' (with padding) | compiled (ms) | pruned (ms) | ideal (ms) "
        "| speed-up | ideal speed-up | share of ideal | select + recycle |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    replay = record["replay"]
    for i, visual in enumerate(record["visual_tokens"]):
        compiled, pruned, ideal = replay["compiled"][i], replay["pruned"][i], replay["ideal"][i]
        layout = pruned.get("layout")
        if layout is None or ideal is None:
            lines.append(f"| {i} | {', '.join(map(str, visual))} | not pruned | | | | | | | | |")
            continue
        lines.append(
            f"| {i} | {', '.join(map(str, visual))} | {layout['N']} | {layout['kept_len']} "
            f"({layout['padded_kept_len']}) | {1e3 * compiled['ttft_s']:.0f} | {1e3 * pruned['ttft_s']:.0f} | "
            f"{1e3 * ideal['ttft_s']:.0f} | {compiled['ttft_s'] / pruned['ttft_s']:.2f}x | "
            f"{compiled['ttft_s'] / ideal['ttft_s']:.2f}x | {100 * ideal['ttft_s'] / pruned['ttft_s']:.0f}% | "
            f"{100 * pruned['selection']['fraction']:.1f}% |"
        )
    return "\n".join(lines)


def plot(record: dict, stem: str) -> list[str]:
    """Time to first token per request of each model and the ideal, and the summary bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = record["models"]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in labels:
        rows = record["per_request"][label]
        ax.plot(range(len(rows)), [1e3 * r["ttft_s"] for r in rows], marker=".", label=f"{label}, first pass")
    for label in (*labels, "ideal"):
        rows = record["replay"][label]
        ax.plot(
            range(len(rows)),
            [1e3 * r["ttft_s"] if r else float("nan") for r in rows],
            linestyle=":",
            marker="x" if label == "ideal" else None,
            label=f"{label}, replay",
        )
    ax.set_yscale("log")
    ax.set_xlabel("request")
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(
        f"{record['model']}: {record['requests']} requests, {record['distinct_visual_token_counts']} image sizes",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    summary, ideal = record["summary"], record["ideal"]
    names = [*labels, "ideal"]
    values = [1e3 * (summary[label]["ttft_p50_s"] or 0) for label in labels] + [1e3 * (ideal["ttft_p50_s"] or 0)]
    colors = {"eager": "gray", "compiled": "tab:blue", "pruned": "tab:green", "ideal": "tab:orange"}
    bars.bar(names, values, color=[colors[n] for n in names])
    for i, label in enumerate(labels):
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
