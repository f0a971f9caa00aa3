"""EntropyPrune's eigensolve: the H x H head Gram (dual) against the d x d covariance (direct).

    python benchmarks/dual_gram.py [--runs 20]

At LLaVA-7B's shape (32 heads, d = 128, 576 visual tokens) and Qwen2.5-VL-7B's (28 heads,
d = 128), both batched over tokens in float64, as the strategy runs them. Median of
``--runs`` after warm-up; the two give the same non-zero eigenvalues (tests/test_strategies.py).
Writes benchmarks/results/dual_gram-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from era_compile.algorithms.entropyprune import covariance_eigenvalues, head_gram_eigenvalues
from era_compile.bench import device_description

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"llava-7b": (576, 32, 128), "qwen2.5-vl-7b": (576, 28, 128)}  # tokens, heads, head dim


def median_seconds(fn, runs: int) -> float:
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    results = {}
    for name, (T, H, d) in SHAPES.items():
        m = torch.randn(T, H, d, generator=torch.Generator().manual_seed(0))
        dual = median_seconds(functools.partial(head_gram_eigenvalues, m), args.runs)
        direct = median_seconds(functools.partial(covariance_eigenvalues, m), args.runs)
        error = (head_gram_eigenvalues(m) - covariance_eigenvalues(m)[:, -H:]).abs().max().item()
        results[name] = {
            "tokens": T,
            "heads": H,
            "head_dim": d,
            "dual_ms": 1e3 * dual,
            "direct_ms": 1e3 * direct,
            "speedup": direct / dual,
            "max_eigenvalue_difference": error,
        }
        print(
            f"{name}: dual {1e3 * dual:.1f} ms, direct {1e3 * direct:.1f} ms, {direct / dual:.1f}x "
            f"(eigenvalues agree to {error:.1e})"
        )
    record = {
        "device": device_description(torch.device("cpu")),
        "torch": torch.__version__,
        "dtype": "float64",
        "runs": args.runs,
        "date": datetime.date.today().isoformat(),
        "shapes": results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "dual_gram-cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
