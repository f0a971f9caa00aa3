"""Biased attention (LAR) against plain SDPA of the same shape, per kernel.

    python benchmarks/attention.py [--runs 20] [--update-ranking] [--dry-run]

Shapes are LLaVA-1.5-7B's attention (32 heads, d = 128, batch 1): a pruned prefill (~100
tokens), the unpruned prefill (640), LLaVA-NeXT's 2,880 tokens, and one decode query over a
4,096-key cache. Every kernel that can run on this device is timed against
``F.scaled_dot_product_attention`` without a bias at the same shape (causal in prefill): the
median of ``--runs`` calls after warm-up, interleaved with the baseline, CUDA events on a GPU
and ``perf_counter`` on CPU. fp32 on CPU, bf16 on CUDA.

Writes ``benchmarks/results/attention-<device>.json`` and ``.png``. With ``--update-ranking``
it also records, for this device type, each regime's kernels fastest first (geometric mean of
biased / plain over the regime's shapes) in ``era_compile/ops/kernel_ranking.json``: what
``kernel="auto"`` reads. Nothing else sets that table. ``--dry-run`` prints what would be
timed on this device (each kernel, or why it cannot run a shape) and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from era_compile.bench import device_description, device_slug
from era_compile.ops.attention import KERNELS, RANKING_FILE, biased_attention, kernel_unsupported

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM = 32, 128
SHAPES = {  # name: (Lq, Lk, regime)
    "llava7b-pruned-100": (100, 100, "prefill"),
    "llava7b-full-640": (640, 640, "prefill"),
    "llava-next-2880": (2880, 2880, "prefill"),
    "decode-1x4096": (1, 4096, "decode"),
}


def timer(device: torch.device):
    if device.type == "cuda":

        def measure(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:

        def measure(fn) -> float:
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin

    return measure


def inputs(Lq: int, Lk: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, HEADS, Lq, HEAD_DIM, generator=g, device=device, dtype=dtype)
    k = torch.randn(1, HEADS, Lk, HEAD_DIM, generator=g, device=device, dtype=dtype)
    v = torch.randn(1, HEADS, Lk, HEAD_DIM, generator=g, device=device, dtype=dtype)
    bias = torch.rand(1, Lk, generator=g, device=device) * math.log(2880)  # log counts of recycled anchors
    return q, k, v, bias


def bench_shape(Lq, Lk, kernels, runs, warmup, dtype, device):
    q, k, v, bias = inputs(Lq, Lk, dtype, device)
    causal = Lq > 1
    calls = {"plain_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    skipped = {}
    for kernel in kernels:
        why = kernel_unsupported(kernel, q, k, None, causal)
        if why is not None:
            skipped[kernel] = why
            continue
        calls[kernel] = lambda kernel=kernel: biased_attention(q, k, v, bias, causal=causal, kernel=kernel)
    measure = timer(device)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(runs):  # interleaved: drifts (clock, cache) hit every kernel alike
            for name, fn in calls.items():
                samples[name].append(measure(fn))
    median = {name: statistics.median(s) for name, s in samples.items()}
    return {
        "median_ms": {n: 1e3 * m for n, m in median.items()},
        "ratio_vs_plain_sdpa": {n: median[n] / median["plain_sdpa"] for n in calls if n != "plain_sdpa"},
        "skipped": skipped,
    }


def ranking(results: dict) -> dict:
    """Per regime: kernels by the geometric mean of their biased / plain ratio, fastest first."""
    out = {}
    for regime in ("prefill", "decode"):
        ratios = {}
        for shape, (_, _, r) in SHAPES.items():
            if r == regime and shape in results:
                for kernel, ratio in results[shape]["ratio_vs_plain_sdpa"].items():
                    ratios.setdefault(kernel, []).append(ratio)
        geo = {k: math.exp(statistics.mean(math.log(x) for x in v)) for k, v in ratios.items()}
        out[regime] = {"ranking": sorted(geo, key=geo.get), "geomean_ratio": geo}
    return out


def plot(results: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results)
    kernels = sorted({k for r in results.values() for k in r["ratio_vs_plain_sdpa"]})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(kernels))
    for i, kernel in enumerate(kernels):
        ys = [results[s]["ratio_vs_plain_sdpa"].get(kernel, float("nan")) for s in shapes]
        ax.bar([x + i * width for x in range(len(shapes))], ys, width, label=kernel)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(kernels) - 1) / 2 for x in range(len(shapes))], shapes, fontsize=8)
    ax.set_ylabel("biased time / plain SDPA time")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def dry_run(args, kernels, dtype, device) -> None:
    """What a run with these arguments would time and write (scripts/gpu-check.sh checks this
    command line on a machine without a GPU)."""
    print(f"dry run on {device_description(device)}, {dtype}, median of {args.runs} after {args.warmup} warm-up")
    for shape in args.shapes:
        Lq, Lk, regime = SHAPES[shape]
        q = torch.empty(1, HEADS, Lq, HEAD_DIM, dtype=dtype, device=device)  # never read: no fill
        k = torch.empty(1, HEADS, Lk, HEAD_DIM, dtype=dtype, device=device)
        plan = {kernel: kernel_unsupported(kernel, q, k, None, Lq > 1) or "timed" for kernel in kernels}
        print(f"  {shape} ({regime}): " + "; ".join(f"{kernel}: {what}" for kernel, what in plan.items()))
    slug = device_slug(device.type, device_description(device))
    print(f"would write {RESULTS / f'attention-{slug}.json'} and .png", end="")
    print(f", and this device type's rankings in {RANKING_FILE}" if args.update_ranking else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--update-ranking",
        action="store_true",
        help=f"record this device type's ranking in {RANKING_FILE.name} (what kernel='auto' reads)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be timed; time and write nothing")
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error("--runs must be >= 20: medians of fewer runs are not recorded")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernels = [k for k in KERNELS if k != "auto"]
    if args.dry_run:
        dry_run(args, kernels, dtype, device)
        return
    results = {}
    for shape in args.shapes:
        Lq, Lk, _ = SHAPES[shape]
        results[shape] = bench_shape(Lq, Lk, kernels, args.runs, args.warmup, dtype, device)
        print(shape, {k: f"{r:.2f}x" for k, r in results[shape]["ratio_vs_plain_sdpa"].items()}, flush=True)

    name = device_description(device)
    slug = device_slug(device.type, name)
    record = {
        "device": name,
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "batch": 1,
        "runs": args.runs,
        "date": datetime.date.today().isoformat(),
        "shapes": {
            s: {"q_len": SHAPES[s][0], "k_len": SHAPES[s][1], "regime": SHAPES[s][2], **results[s]} for s in results
        },
        "ranking": ranking(results),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"attention-{slug}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    plot(
        results,
        f"biased attention / plain SDPA, {name}, {record['dtype']}, median of {args.runs}",
        out.with_suffix(".png"),
    )
    print(f"wrote {out} and {out.with_suffix('.png').name}")

    if args.update_ranking:
        table = json.loads(RANKING_FILE.read_text()) if RANKING_FILE.exists() else {"devices": {}}
        table["devices"][device.type] = {
            regime: {
                "ranking": r["ranking"],
                "measured_on": name,
                "source": f"benchmarks/results/{out.name}",
                "date": record["date"],
            }
            for regime, r in record["ranking"].items()
            if r["ranking"]
        }
        RANKING_FILE.write_text(json.dumps(table, indent=2) + "\n")
        print(f"updated {RANKING_FILE}")


if __name__ == "__main__":
    main()
