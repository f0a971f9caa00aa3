"""Decode tokens/s of a zoo model: eager unpruned vs compiled unpruned vs compiled pruned.

    python benchmarks/decode_throughput.py [--model llava] [--new-tokens 64] [--runs 5]

Each setting generates greedily from the same prompt; runs are interleaved (a, b, c, a, b, c,
...) after a warm-up, and the median is reported. Decode tokens/s = (new tokens - 1) /
(generate time - prefill time), the prefill being timed as a generate of one token. An
observation for the record, not a test: on the tiny models Python overhead dominates.
Writes benchmarks/results/decode_throughput-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from era_compile import ERAConfig, make_era_backend, zoo


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava", choices=zoo.names())
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    args = parser.parse_args()

    settings = {}
    for name, config in [("eager_unpruned", None),
                         ("compiled_unpruned", ERAConfig(keep_ratio=1.0, layer=args.layer, rectify=False)),
                         ("compiled_pruned", ERAConfig(keep_ratio=args.keep_ratio, layer=args.layer))]:
        model, inputs = zoo.build(args.model)
        if config is not None:
            model.compile(backend=make_era_backend(config))
        settings[name] = (model, inputs)

    def generate(model, inputs, n):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    for model, inputs in settings.values():  # warm-up: compiles prefill and both decode graphs
        generate(model, inputs, 3)
        generate(model, inputs, args.new_tokens)
    samples = {name: {"prefill": [], "generate": []} for name in settings}
    for _ in range(args.runs):
        for name, (model, inputs) in settings.items():
            samples[name]["prefill"].append(_time(lambda: generate(model, inputs, 1)))
            samples[name]["generate"].append(_time(lambda: generate(model, inputs, args.new_tokens)))

    result = {"model": args.model, "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "new_tokens": args.new_tokens,
              "runs": args.runs, "layer": args.layer, "keep_ratio": args.keep_ratio, "settings": {}}
    for name, s in samples.items():
        prefill, total = statistics.median(s["prefill"]), statistics.median(s["generate"])
        tps = (args.new_tokens - 1) / max(total - prefill, 1e-9)
        result["settings"][name] = {"prefill_ms": 1e3 * prefill, "generate_ms": 1e3 * total,
                                    "decode_tokens_per_s": tps}
        print(f"{name:18s} prefill {1e3 * prefill:7.1f} ms   decode {tps:7.1f} tokens/s")
    out = Path(__file__).parent / "results" / f"decode_throughput-{args.model}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
