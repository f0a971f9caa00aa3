"""Compile time of the era backend against plain ``torch.compile`` (both Inductor), cold and warm.

    .venv/bin/python benchmarks/compile_time.py [--model llava-bench] [--repeats 2]

Each measurement is a fresh process (so Dynamo and the in-memory caches start empty) that builds
the zoo model, compiles it and runs ``generate(max_new_tokens=3)`` twice: the first call's time
minus the second's is the compile time (the prefill graph and the decode graphs). "cold" gives
the process an empty Inductor cache directory; "warm" reuses the one a cold run of the same
mode filled (Inductor's FX graph cache hits; Dynamo and our passes run again). Writes
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
model, inputs = zoo.build(sys.argv[1])
mode = sys.argv[2]
backend = make_era_backend(ERAConfig(layer=2, keep_tokens=64, compiler="inductor")) if mode == "era" else "inductor"
model.compile(backend=backend)
def run():
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return time.perf_counter() - start
first, second = run(), run()
report = backend.report if mode == "era" else None
print(json.dumps({"first_s": first, "steady_s": second, "compile_s": first - second,
                  "backend_compile_s": report.compile_seconds if report else None,
                  "pass_ms": sum(report.pass_ms().values()) if report else None,
                  "pruned": report.pruned if report else None}))
"""


def measure(model: str, mode: str, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, mode], env=env, capture_output=True, text=True, check=True
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

    runs = {"plain": {"cold": [], "warm": []}, "era": {"cold": [], "warm": []}}
    for _ in range(args.repeats):
        for mode in ("plain", "era"):  # interleaved: the machine's drift hits both
            with tempfile.TemporaryDirectory() as cache:
                runs[mode]["cold"].append(measure(args.model, mode, cache))
                runs[mode]["warm"].append(measure(args.model, mode, cache))
    summary = {
        mode: {state: statistics.median(r["compile_s"] for r in rows) for state, rows in states.items()}
        for mode, states in runs.items()
    }
    ratio = {state: summary["era"][state] / summary["plain"][state] for state in ("cold", "warm")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        "model": args.model,
        "device": device_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "compile_s": summary,
        "era_over_plain": ratio,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile-time-{args.model}-{device_slug(device.type, record['device'])}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    for state in ("cold", "warm"):
        print(
            f"{state}: plain {summary['plain'][state]:.1f} s, era {summary['era'][state]:.1f} s ({ratio[state]:.2f}x)"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
