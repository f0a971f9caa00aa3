"""Time the passes (not the inner compiler) per graph on a zoo model's greedy generate.

    .venv/bin/python benchmarks/pass_time.py [--model llava-bench] [--repeats 3] [--label after]

Each repeat is a fresh process that builds the model, compiles it with the era backend and the
eager inner compiler (so Inductor's time does not hide the passes'), and runs
``generate(max_new_tokens=3)`` once: the prefill, its decode steps and the handoffs all go through
the passes. It records, per graph the backend saw, the passes' wall time (``Report.pass_ms``:
each pass and the checks after it, normalize and classification included) and, per pass, the
sum over graphs. The medians over the repeats go to ``benchmarks/results/pass-time-<model>-cpu.json``
under ``--label`` (an earlier label's numbers stay, so a before/after pair sits in one file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from era_compile import ERAConfig, make_era_backend, zoo
model, inputs = zoo.build(sys.argv[1])
backend = make_era_backend(ERAConfig(layer=2, keep_tokens=64, compiler="eager"))
model.compile(backend=backend)
start = time.perf_counter()
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
report = backend.report
print(json.dumps({"wall_s": time.perf_counter() - start, "pruned": report.pruned,
                  "backend_s": report.compile_seconds,
                  "per_graph_ms": {str(g): ms for g, ms in report.pass_ms().items()},
                  "per_pass_ms": report.ms_per_pass(),
                  "kinds": {str(e["graph"]): e["kind"] for e in report.passes}}))
"""


def measure(model: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="current", help="the key this run is recorded under")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    import torch
    import transformers

    runs = [measure(args.model) for _ in range(args.repeats)]
    if not all(r["pruned"] for r in runs):
        print("a run did not prune: its pass times measure a fallback", file=sys.stderr)
        return 1
    graphs = sorted({g for r in runs for g in r["per_graph_ms"]}, key=int)
    passes = sorted({p for r in runs for p in r["per_pass_ms"]})
    record = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "repeats": args.repeats,
        "per_graph_ms": {g: round(statistics.median(r["per_graph_ms"].get(g, 0.0) for r in runs), 1) for g in graphs},
        "kinds": runs[0]["kinds"],
        "per_pass_ms": {p: round(statistics.median(r["per_pass_ms"].get(p, 0.0) for r in runs), 1) for p in passes},
        "all_graphs_ms": round(statistics.median(sum(r["per_graph_ms"].values()) for r in runs), 1),
        "backend_s": round(statistics.median(r["backend_s"] for r in runs), 2),
    }
    path = Path(args.out) / f"pass-time-{args.model}-cpu.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded[args.label] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
