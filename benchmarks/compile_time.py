"""Compile time of the era backend against plain ``torch.compile`` (both Inductor), cold and warm.

    .venv/bin/python benchmarks/compile_time.py [--model llava-bench] [--repeats 2]

Each measurement is a fresh process (so Dynamo and the in-memory caches start empty) that builds
the zoo model, compiles it and runs ``generate(max_new_tokens=3)`` twice: the first call's time
minus the second's is the compile time (the prefill graph and the decode graphs). "cold" gives
the process an empty Inductor cache directory; "warm" reuses the one a cold run of the same
mode filled (Inductor's FX graph cache hits; Dynamo and our passes run again). The era backend
runs at K = 2 (the record's ``era``) and at K = 0 (``era-k0``: every decoder layer at the pruned
length); per run, each graph's Inductor seconds (``graphs``: the era report's kind beside it).
Writes
``benchmarks/results/compile-time-<model>-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from era_compile import ERAConfig, make_era_backend, zoo
from era_compile.backend import inner_compile
model, inputs = zoo.build(sys.argv[1])
mode = sys.argv[2]
graphs = []  # plain: per graph, its size and Inductor's seconds on it

def timed_inductor(gm, example_inputs):
    start = time.perf_counter()
    try:
        return inner_compile(gm, example_inputs, "inductor")
    finally:
        graphs.append({"nodes": len(gm.graph.nodes), "inner_compile_s": time.perf_counter() - start})

if mode == "plain":
    backend = timed_inductor
else:
    backend = make_era_backend(ERAConfig(layer=int(mode.split("-k")[1]), keep_tokens=64, compiler="inductor"))
model.compile(backend=backend)
def run():
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return time.perf_counter() - start
first, second = run(), run()
report = None if mode == "plain" else backend.report
if report is not None:
    graphs = [{"graph": e["graph"], "kind": e.get("kind"), "inner_compile_s": e.get("inner_compile_ms", 0) / 1e3}
              for e in report.passes]
print(json.dumps({"first_s": first, "steady_s": second, "compile_s": first - second,
                  "backend_compile_s": report.compile_seconds if report else None,
                  "pass_ms": sum(report.pass_ms().values()) if report else None,
                  "pruned": report.pruned if report else None, "graphs": graphs}))
"""


MODES = {"plain": "plain", "era": "era-k2", "era-k0": "era-k0"}  # the record's name: the child's mode


def measure(model: str, mode: str, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, MODES[mode]], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-bench")
    parser.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per mode (medians recorded)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    import statistics

    import torch
    import transformers

    from era_compile.bench import device_description, device_slug

    runs = {mode: {"cold": [], "warm": []} for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved: the machine's drift hits both
            with tempfile.TemporaryDirectory() as cache:
                runs[mode]["cold"].append(measure(args.model, mode, cache))
                runs[mode]["warm"].append(measure(args.model, mode, cache))
    summary = {
        mode: {state: statistics.median(r["compile_s"] for r in rows) for state, rows in states.items()}
        for mode, states in runs.items()
    }
    ratio = {state: summary["era"][state] / summary["plain"][state] for state in ("cold", "warm")}
    ratio_k0 = {state: summary["era-k0"][state] / summary["plain"][state] for state in ("cold", "warm")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        "model": args.model,
        "device": device_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "compile_s": summary,
        "era_over_plain": ratio,
        "era_k0_over_plain": ratio_k0,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile-time-{args.model}-{device_slug(device.type, record['device'])}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    for state in ("cold", "warm"):
        print(
            f"{state}: plain {summary['plain'][state]:.1f} s, era {summary['era'][state]:.1f} s ({ratio[state]:.2f}x), "
            f"era at K = 0 {summary['era-k0'][state]:.1f} s ({ratio_k0[state]:.2f}x)"
        )
    for mode in MODES:
        cold = runs[mode]["cold"][0]["graphs"]
        print(f"{mode}, cold, Inductor per graph:", ", ".join(f"{g['inner_compile_s']:.1f} s" for g in cold))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
