"""What ``era::select`` and ``era::recycle`` cost per prefill, and what their loop over image sizes costs.

    python benchmarks/selection.py [--runs 5] [--strategy era]

Both ops handle the samples of a batch in groups of equal visual-token count ``T`` (a strategy
sees ``[b, T, ...]`` tensors of one ``T``), so a batch of 8 prompts with 8 image sizes runs the
strategy, BTR and the sequence assembly 8 times, and each group reads a few values back to the
host (its rows, its ``T``, its anchors' count: a synchronisation each on a GPU). Measured at the
traffic model's layer-K shapes (``qwen2-vl-serve``: width 1,024, 16 heads of 64; left-padded
prompts of 18 text tokens around one image), three layouts:

* ``8 sizes``: batch 8, T from 1,024 down to 300 (8 groups);
* ``one size``: batch 8, every T the mean of those (one group, the same visual tokens in all);
* ``one prompt``: batch 1, T = 1,024.

Per layout: median milliseconds of each op, the groups, and the host reads of one call (the
data-dependent ops a dispatch mode sees: ``_local_scalar_dense`` for ``int()``/``bool()``,
``nonzero``, ``unique``; ``tolist`` is not dispatched and is counted with ``unique``). The loop's
cost is ``8 sizes`` against ``one size``: the same work, eight groups against one. The share of
a real prefill is in serve-bench's record (``selection`` per request). Writes
``benchmarks/results/selection-<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from era_compile.algorithms.sequence import equal_count_groups, real_tokens
from era_compile.bench import _sync, device_description, device_slug
from era_compile.ops.prune import recycle_kept, select_anchors

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH, HEADS, HEAD_DIM, TEXT = 1024, 16, 64, 18
SIZES = [1024, 900, 800, 700, 600, 500, 400, 300]
LAYOUTS = {
    "8 sizes": SIZES,
    "one size": [round(sum(SIZES) / len(SIZES))] * len(SIZES),
    "one prompt": [max(SIZES)],
}
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten._unique2", "aten.unique_dim", "aten.masked_select"}


class HostReads(TorchDispatchMode):
    """Counts the ops whose result the host must wait for."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket._qualified_op_name.replace("::", ".") in HOST_READS
        return func(*args, **(kwargs or {}))


def layer_k_inputs(sizes: list[int], device: torch.device, seed: int = 0) -> dict:
    """Random states at layer K for left-padded prompts of ``TEXT`` tokens around an image of each size."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(sizes), max(sizes) + TEXT
    visual = torch.zeros(batch, length, dtype=torch.bool)
    real = torch.zeros(batch, length, dtype=torch.bool)
    for b, size in enumerate(sizes):
        start = length - size - TEXT
        real[b, start:] = True
        visual[b, start + 6 : start + 6 + size] = True
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (real[:, None, None, :] & causal) | torch.eye(length, dtype=torch.bool)
    tensors = {
        "hidden": torch.randn(batch, length, WIDTH, generator=g),
        "visual_mask": visual,
        "queries": torch.randn(batch, HEADS, length, HEAD_DIM, generator=g),
        "keys": torch.randn(batch, HEADS, length, HEAD_DIM, generator=g),
        "attn_mask": mask,
    }
    return {name: t.to(device) for name, t in tensors.items()}


def measure(inputs: dict, strategy: str, runs: int, device: torch.device) -> dict:
    x = inputs
    real = real_tokens(x["attn_mask"], *x["visual_mask"].shape)

    def select():
        return select_anchors(
            x["hidden"], x["visual_mask"], x["queries"], x["keys"], x["attn_mask"], False, HEAD_DIM**-0.5,
            0.25, None, strategy, {},
        )  # fmt: skip

    anchors, confidence = select()

    def recycle():
        return recycle_kept(x["hidden"], x["visual_mask"], anchors, confidence, True, "mean", real)

    def median_ms(fn) -> float:
        fn()
        samples = []
        for _ in range(runs):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - start)
        return 1e3 * statistics.median(samples)

    reads = {}
    for name, fn in (("select", select), ("recycle", recycle)):
        with HostReads() as counter:
            fn()
        reads[name] = counter.count
    return {
        "visual_tokens": x["visual_mask"].sum(-1).tolist(),
        "groups": len(equal_count_groups(x["visual_mask"])),
        "select_ms": median_ms(select),
        "recycle_ms": median_ms(recycle),
        "host_reads": reads,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--strategy", default="era")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layouts = {
        name: measure(layer_k_inputs(sizes, device), args.strategy, args.runs, device)
        for name, sizes in LAYOUTS.items()
    }
    grouped, one = layouts["8 sizes"], layouts["one size"]
    record = {
        "device": device_description(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "strategy": args.strategy,
        "runs": args.runs,
        "shape": {"width": WIDTH, "heads": HEADS, "head_dim": HEAD_DIM, "text_tokens": TEXT},
        "layouts": layouts,
        "loop_cost_ms": (grouped["select_ms"] + grouped["recycle_ms"]) - (one["select_ms"] + one["recycle_ms"]),
    }
    for name, row in layouts.items():
        print(
            f"{name:>10}: {row['groups']} group(s), select {row['select_ms']:.1f} ms, recycle "
            f"{row['recycle_ms']:.1f} ms, host reads {row['host_reads']}"
        )
    print(f"the loop over 8 image sizes costs {record['loop_cost_ms']:.1f} ms against one group of the same tokens")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"selection-{device_slug(device.type, record['device'])}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
