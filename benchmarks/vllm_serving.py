"""A stream of requests through vLLM with and without the era plugin, on this machine's CPU.

    scripts/test-vllm.sh --setup-only                      # the vLLM environment, once
    .venv-vllm/bin/python benchmarks/vllm_serving.py       # measure: JSON
    .venv/bin/python benchmarks/vllm_serving.py --plot     # draw it: PNG (matplotlib is in the main venv)

The model is a random-init LLaVA-1.5 layout written offline at a realistic text width (1024 wide, 8
layers, 64-wide heads; the LLaVA-1.5 image grid, 336 px in 14 px patches: 576 visual tokens per
image) with a small vision tower: what pruning saves is the decoder's work and its KV cache. The
stream is seeded: requests arrive every ``--interval`` seconds, three in four with an image of one
of four sizes, prompts of 40 to 300 characters (one token each), ``--new-tokens`` generated with EOS
ignored, up to ``--max-seqs`` in flight. Each mode starts its own engine (compiled by vLLM, as
served), warms it up on one request, then runs the stream: requests/s, output tokens/s, time to
first token p50/p95 (from a request's arrival), prompt tokens and the KV blocks held per running
request, read off vLLM's scheduler every step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path("benchmarks/results/vllm-serving-llava-cpu.json")
SIZES = [(336, 336), (640, 480), (224, 224), (500, 800)]
WORDS = "what which colour shape where left right top bottom count describe small large near far the a of in".split()


def stream(requests: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        words = []
        target = rng.randint(40, 300)
        while len(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        text = " ".join(words)
        if rng.random() < 0.75:
            out.append({"prompt": f"USER: <image>\n{text}? ASSISTANT:", "size": rng.choice(SIZES), "seed": i})
        else:
            out.append({"prompt": f"USER: {text}? ASSISTANT:", "size": None, "seed": i})
    return out


def engine_input(request: dict) -> dict:
    from PIL import Image

    if request["size"] is None:
        return {"prompt": request["prompt"]}
    rng = random.Random(request["seed"])
    colour = tuple(rng.randrange(256) for _ in range(3))
    return {"prompt": request["prompt"], "multi_modal_data": {"image": Image.new("RGB", request["size"], colour)}}


def run_mode(path: Path, era: dict | None, requests: list[dict], args) -> dict:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    extra = {} if era is None else {"additional_config": {"era": era}}
    llm = LLM(
        model=str(path),
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=args.max_seqs,
        gpu_memory_utilization=0.3,
        limit_mm_per_prompt={"image": 1},
        seed=0,
        **extra,
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    block_size = scheduler.cache_config.block_size
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    llm.generate([engine_input(requests[0])], params, use_tqdm=False)  # warm-up: compile, first-call costs

    pending = list(enumerate(requests))
    arrival, first, done, prompt_tokens, outputs = {}, {}, {}, {}, {}
    samples = []  # (blocks in use, requests running) per step
    start = time.perf_counter()
    label = "era" if era else "plain"
    with tqdm(total=len(requests), desc=f"vLLM {label}", unit="req") as bar:
        while pending or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while pending and pending[0][0] * args.interval <= now:
                i, request = pending.pop(0)
                engine.add_request(f"r{i}", engine_input(request), params)
                arrival[f"r{i}"] = time.perf_counter()
            if not engine.has_unfinished_requests():
                time.sleep(min(0.01, max(0.0, pending[0][0] * args.interval - now)))
                continue
            for out in engine.step():
                stamp = time.perf_counter()
                if out.outputs[0].token_ids and out.request_id not in first:
                    first[out.request_id] = stamp
                if out.finished:
                    done[out.request_id] = stamp
                    prompt_tokens[out.request_id] = len(out.prompt_token_ids)
                    outputs[out.request_id] = len(out.outputs[0].token_ids)
                    bar.update(1)
            running = len(scheduler.running)
            if running:
                samples.append((pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(), running))
    wall = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()
    del llm

    ttft = sorted((first[r] - arrival[r]) * 1000 for r in arrival)
    image_ids = [f"r{i}" for i, r in enumerate(requests) if r["size"] is not None]
    return {
        "mode": label,
        "era": era,
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "output_tokens_per_s": sum(outputs.values()) / wall,
        "ttft_ms_p50": statistics.median(ttft),
        "ttft_ms_p95": ttft[min(len(ttft) - 1, math.ceil(0.95 * len(ttft)) - 1)],
        "prompt_tokens_mean_image_requests": statistics.mean(prompt_tokens[r] for r in image_ids),
        "kv_blocks_per_running_request_mean": statistics.mean(b / n for b, n in samples),
        "kv_blocks_peak": max(b for b, _ in samples),
        "kv_blocks_per_image_request_theory": statistics.mean(
            math.ceil((prompt_tokens[r] + args.new_tokens) / block_size) for r in image_ids
        ),
        "block_size": block_size,
        "steps": len(samples),
    }


def measure(args) -> None:
    import torch
    import transformers
    import vllm

    from era_compile import ERAConfig
    from era_compile.vllm.offline import write_llava

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler is read in this process
    scratch = Path(tempfile.mkdtemp(prefix="era-vllm-bench-"))
    for name, sub in [("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")]:
        os.environ.setdefault(name, str(scratch / sub))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    shape = dict(hidden=1024, layers=8, heads=16, kv_heads=4, image_size=336, patch=14)
    path = write_llava(scratch / "llava", **shape)
    requests = stream(args.requests, args.seed)
    era = {"keep_ratio": args.keep_ratio}
    modes = [run_mode(path, None, requests, args), run_mode(path, era, requests, args)]
    plain, pruned = modes
    record = {
        "what": "a seeded stream through vLLM (vllm-cpu, this machine's CPU) with and without the era plugin",
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": f"{os.cpu_count()} CPU cores",
        "model": {**shape, "visual_tokens_per_image": 576, "text_vocab": 256},
        "stream": {
            "requests": args.requests,
            "with_image": sum(r["size"] is not None for r in requests),
            "interval_s": args.interval,
            "new_tokens": args.new_tokens,
            "max_seqs": args.max_seqs,
            "seed": args.seed,
        },
        "modes": modes,
        "theory": {
            "visual_tokens_kept": ERAConfig(layer=0, **era).kept(576),
            "prompt_tokens_saved_per_image_request": 576 - ERAConfig(layer=0, **era).kept(576),
        },
        "speedup": {
            "requests_per_s": pruned["requests_per_s"] / plain["requests_per_s"],
            "ttft_p50": plain["ttft_ms_p50"] / pruned["ttft_ms_p50"],
            "kv_blocks_per_running_request": plain["kv_blocks_per_running_request_mean"]
            / pruned["kv_blocks_per_running_request_mean"],
        },
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["speedup"], indent=2))
    print(f"wrote {RESULT}")


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(RESULT.read_text())
    modes = record["modes"]
    panels = [
        ("requests/s", "requests_per_s"),
        ("output tokens/s", "output_tokens_per_s"),
        ("TTFT p50 (ms)", "ttft_ms_p50"),
        ("TTFT p95 (ms)", "ttft_ms_p95"),
        ("KV blocks per running request", "kv_blocks_per_running_request_mean"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [m[key] for m in modes]
        ax.bar([m["mode"] for m in modes], values, color=["#888888", "#2a7ab0"])
        ax.set_title(title, fontsize=10)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    era = modes[1]["era"]
    fig.suptitle(
        f"vLLM (CPU) with and without era, keep_ratio={era['keep_ratio']}: {record['stream']['requests']} requests, "
        f"LLaVA layout 1024 x 8, 576 visual tokens",
        fontsize=10,
    )
    fig.tight_layout()
    out = RESULT.with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", action="store_true", help="draw the recorded JSON (main venv)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between arrivals")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-seqs", type=int, default=4)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.plot:
        plot()
    else:
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
