"""Compile time of the era backend against plain ``torch.compile`` (both Inductor), cold and warm.

    .venv/bin/python benchmarks/compile_time.py [--model llava-bench] [--repeats 2]

Each measurement is a fresh process (so Dynamo and the in-memory caches start empty) that builds
the zoo model, compiles it and runs ``generate(max_new_tokens=3)`` twice: the first call's time
minus the second's is the compile time (the prefill graph and the decode graphs). "cold" gives
the process an empty Inductor cache directory; "warm" reuses the one a cold run of the same
mode filled (Inductor's FX graph cache hits; Dynamo and our passes run again). The era backend
runs at K = 2 (the record's ``era``) and at K = 0 (``era-k0``: every decoder layer at the pruned
length); per run, each graph Inductor compiled, in order (``graphs``: the era report's kind beside
it): its seconds and where they went (AOT autograd's trace, lowering and code generation, the wait
for its C++ kernels' compiles) and how many C++ kernels it compiled.
Writes
``benchmarks/results/compile-time-<model>-<device>.json`` (``--dynamic``: every model compiled with
``dynamic=True``, ``compile-time-<model>-dynamic-<device>.json``).
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
from torch._dynamo.utils import compilation_time_metrics as phases
import era_compile.backend
from era_compile import ERAConfig, make_era_backend, zoo
model, inputs = zoo.build(sys.argv[1])
mode, dynamic = sys.argv[2], {"static": None, "dynamic": True}[sys.argv[3]]
inductor = []  # per Inductor compile, in order: its graph's size, seconds, and where they went
real_inner_compile = era_compile.backend.inner_compile

def since(before, name):
    return phases.get(name, [])[before.get(name, 0):]

def timed_inductor(gm, example_inputs, compiler="inductor"):
    before = {name: len(values) for name, values in phases.items()}
    start = time.perf_counter()
    try:
        return real_inner_compile(gm, example_inputs, compiler)
    finally:
        seconds = lambda name: round(sum(since(before, name)), 3)
        inductor.append({
            "nodes": len(gm.graph.nodes),
            "inner_compile_s": round(time.perf_counter() - start, 3),
            # AOT autograd's trace of the graph (make_fx, functionalisation): the dispatcher less the compiler
            "aot_trace_s": round(
                seconds("create_aot_dispatcher_function") - seconds("compile_fx.<locals>.fw_compiler_base"), 3
            ),
            "lowering_and_codegen_s": round(seconds("GraphLowering.run") + seconds("GraphLowering.codegen"), 3),
            "cpp_compile_wait_s": seconds("async_compile.wait"),  # the C++ kernels' compiles still running
            "cpp_kernels_compiled": len(since(before, "compile_file")),
        })

era_compile.backend.inner_compile = timed_inductor  # the era backend's call of Inductor, timed the same way
if mode == "plain":
    backend = timed_inductor
else:
    backend = make_era_backend(ERAConfig(layer=int(mode.split("-k")[1]), keep_tokens=64, compiler="inductor"))
model.compile(backend=backend, dynamic=dynamic)
def run():
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return time.perf_counter() - start
first, second = run(), run()
report = None if mode == "plain" else backend.report
kinds = [e.get("kind") for e in report.passes] if report is not None else []
kinds = kinds if len(kinds) == len(inductor) else [None] * len(inductor)  # plain: no kinds
graphs = [dict(g, kind=kind) for g, kind in zip(inductor, kinds)]
print(json.dumps({"first_s": first, "steady_s": second, "compile_s": first - second,
                  "backend_compile_s": report.compile_seconds if report else None,
                  "pass_ms": sum(report.pass_ms().values()) if report else None,
                  "pruned": report.pruned if report else None, "graphs": graphs,
                  "inductor_total_s": round(sum(g["inner_compile_s"] for g in graphs), 3),
                  "cpp_kernels_compiled": sum(g["cpp_kernels_compiled"] for g in graphs)}))
"""


MODES = {"plain": "plain", "era": "era-k2", "era-k0": "era-k0"}  # the record's name: the child's mode


def measure(model: str, mode: str, cache_dir: str, dynamic: bool = False) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, MODES[mode], "dynamic" if dynamic else "static"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-bench")
    parser.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per mode (medians recorded)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--dynamic", action="store_true", help="every model compiled with dynamic=True (what a server may pass)"
    )
    args = parser.parse_args()
    import statistics

    import torch
    import transformers

    from era_compile.bench import device_description, device_slug

    runs = {mode: {"cold": [], "warm": []} for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved: the machine's drift hits both
            with tempfile.TemporaryDirectory() as cache:
                runs[mode]["cold"].append(measure(args.model, mode, cache, args.dynamic))
                runs[mode]["warm"].append(measure(args.model, mode, cache, args.dynamic))
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
        "dynamic": args.dynamic,
        "compile_s": summary,
        "era_over_plain": ratio,
        "era_k0_over_plain": ratio_k0,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-dynamic" if args.dynamic else ""
    path = out / f"compile-time-{args.model}{suffix}-{device_slug(device.type, record['device'])}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    for state in ("cold", "warm"):
        print(
            f"{state}: plain {summary['plain'][state]:.1f} s, era {summary['era'][state]:.1f} s ({ratio[state]:.2f}x), "
            f"era at K = 0 {summary['era-k0'][state]:.1f} s ({ratio_k0[state]:.2f}x)"
        )
    for mode in MODES:
        cold = runs[mode]["cold"][0]
        print(
            f"{mode}, cold: Inductor {cold['inductor_total_s']:.1f} s, {cold['cpp_kernels_compiled']} C++ kernels; "
            "per graph (s / kernels):",
            ", ".join(f"{g['inner_compile_s']:.1f} / {g['cpp_kernels_compiled']}" for g in cold["graphs"]),
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
