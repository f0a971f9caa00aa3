"""What pruning buys, measured: ``era-compile bench MODEL``.

For each (K, kept tokens) point of a sweep, three models with the same weights run interleaved
in one process (a, b, c, a, b, c, ... after warm-up, medians of ``runs``):

* ``eager``: the unpruned model, no compile;
* ``compiled``: the unpruned model under ``torch.compile`` with the same inner compiler
  (Inductor by default), the fair baseline;
* ``pruned``: the model compiled with the era backend at that point.

Prefill time is a ``generate`` of one token (time to first token); decode time per token is
``(generate(n) - generate(1)) / (n - 1)``. Beside the times:

* the language model's prefill FLOPs, unpruned and pruned, counted by
  ``torch.utils.flop_counter`` on the eager reference of the same pruning (the vision tower is
  left out: pruning does not touch it), and the theoretical speedup they allow;
* the share of the pruned prefill spent in ``era::select`` and ``era::recycle`` (timed around them);
* KV-cache bytes after prefill and after the generated tokens, unpruned and pruned, against the
  theoretical saving (layers >= K holding ``N - n'`` positions fewer), and peak CUDA memory on a
  GPU;
* the throughput of the decoder's largest linear layer at the sequence lengths before and
  after pruning: the FLOPs bound assumes one rate for both, and on CPU BLAS a short
  sequence often runs slower per FLOP;
* the ideal bound: what a perfect pruner that costs nothing would reach on this machine. At
  K = 0, the compiled unpruned model's prefill on a text prompt of each sample's kept length
  (``n'`` tokens, padded as the batch is), plus its vision tower on the image (compiled with the
  same inner compiler: every pruner must encode the image). At K > 0 the first K of the L layers
  still run on the whole prompt: the text part is then ``K/L`` of the prefill on the prompt's own
  lengths plus ``(L-K)/L`` of the one on the kept lengths (both measured; the layers are equal,
  the LM head reads the last position only). ``measured_vs_ideal`` is ideal time over pruned time,
  the pruned prefill timed again in the ideal's rounds (1.0: the pruner is free); the per-pass
  compile times of the pruned model beside it;
* at K = 0, what knowing the kept tokens costs that the ideal does not pay: layer 0's queries and
  keys over the unpruned prompt, and what the rows the saliency reads would cost
  (``layer0_selection_cost``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from era_compile.backend import make_era_backend
from era_compile.compact_kv import cache_bytes, stored_bytes, stored_rows
from era_compile.compat import output_cache
from era_compile.config import ERAConfig
from era_compile.recompiles import recompile_headroom
from era_compile.reference import EagerReference


def device_description(device: torch.device) -> str:
    """What a recorded result ran on: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def device_slug(device_type: str, description: str) -> str:
    """The device part of a results file name: ``cpu``, or e.g. ``h100-80gb-hbm3``."""
    return "cpu" if device_type == "cpu" else description.lower().replace("nvidia ", "").replace(" ", "-")


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, inputs: dict, new_tokens: int):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )


def timed(fn: Callable, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_times(
    models: dict[str, torch.nn.Module],
    inputs: dict,
    *,
    runs: int,
    new_tokens: int,
    device: torch.device,
    progress: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """Median prefill seconds and decode seconds per token of each model, runs interleaved."""
    for model in models.values():  # warm-up: compiles prefill and the decode graphs
        _generate(model, inputs, 3)
        _generate(model, inputs, new_tokens)
    samples: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "generate": []} for name in models}
    for _ in range(runs):
        for name, model in models.items():
            samples[name]["prefill"].append(timed(functools.partial(_generate, model, inputs, 1), device))
            samples[name]["generate"].append(timed(functools.partial(_generate, model, inputs, new_tokens), device))
        if progress:
            progress()
    out = {}
    for name, s in samples.items():
        prefill = statistics.median(s["prefill"])
        decode = (statistics.median(s["generate"]) - prefill) / max(1, new_tokens - 1)
        out[name] = {"prefill_s": prefill, "decode_s_per_token": decode}
    return out


# --------------------------------------------------------------------------- FLOPs, overhead, memory


def _register_attention_flops(op) -> None:
    """Give FlopCounterMode attention's formula (QK^T and PV, 2 * 2 * B * Hq * Lq * Lk * d) for
    ``op``; repeats change nothing."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if op in flop_registry:
        return

    @register_flop_formula(op)
    def _flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, lq, d = query_shape
        return 2 * b * h * lq * key_shape[2] * d + 2 * b * h * lq * key_shape[2] * value_shape[3]


def register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not PyTorch's CPU flash kernel, which
    then counts as 0: give it attention's formula. Done when FLOPs are first counted."""
    _register_attention_flops(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)


def register_biased_attention_flops() -> None:
    """FlopCounterMode sees ``era::biased_attention`` as one op (what its kernels run inside is not
    counted): give it attention's formula, so a compiled pruned graph's count includes its
    attention. Done when compiled graphs' FLOPs are first counted."""
    _register_attention_flops(torch.ops.era.biased_attention)


def language_model_flops(model, inputs: dict, config: ERAConfig | None) -> int:
    """Prefill FLOPs of the decoder stack and LM head (vision tower excluded), eager, with the
    pruning of ``config`` (None: unpruned)."""
    register_cpu_sdpa_flops()
    counter = FlopCounterMode(display=False)
    run = model if config is None else EagerReference(model, config)
    with counter, torch.no_grad():
        run(**inputs)
    counts = counter.get_flop_counts()
    decoder = _module_path(model, model.get_decoder())
    head = _module_path(model, model.get_output_embeddings())
    return int(sum(sum(v.values()) for k, v in counts.items() if k in (decoder, head)))


def _module_path(model, module) -> str:
    """The name FlopCounterMode gives a submodule: the root class name, then the dotted path."""
    for name, m in model.named_modules():
        if m is module:
            return f"{type(model).__name__}.{name}" if name else type(model).__name__
    raise ValueError("module not found in the model")


def selection_overhead(model, inputs: dict) -> dict:
    """Seconds in era::select and era::recycle within one pruned compiled prefill, and their share.

    Timed around the ops' own implementations (``select_anchors`` and ``recycle_kept``, which the
    ops call by their module's names), not by the profiler: its cost per recorded op inflates
    these two, which run many small ops (a profiled prefill put them at 17% where their wall
    time is 3%)."""
    from era_compile.ops import prune

    seconds = {"select_anchors": 0.0, "recycle_kept": 0.0}
    device = next(model.parameters()).device

    def timing(name: str, fn: Callable) -> Callable:
        def timed_call(*args):
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                _sync(device)
                seconds[name] += time.perf_counter() - start

        return timed_call

    originals = {name: getattr(prune, name) for name in seconds}
    try:
        for name, fn in originals.items():
            setattr(prune, name, timing(name, fn))
        wall = timed(lambda: _generate(model, inputs, 1), device)
    finally:
        for name, fn in originals.items():
            setattr(prune, name, fn)
    return {
        "select_s": seconds["select_anchors"],
        "recycle_s": seconds["recycle_kept"],
        "prefill_s": wall,
        "fraction": sum(seconds.values()) / wall if wall else 0.0,
    }


def linear_throughput(model, rows: int, *, repeats: int = 10) -> float:
    """GFLOP/s of the decoder's largest linear layer (its own weight) on ``rows`` tokens, best of
    ``repeats``: ``F.linear``, the matmul Inductor emits for it."""
    linears = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    weight = max(linears, key=lambda m: m.weight.numel()).weight.detach()
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    device = weight.device
    with torch.no_grad():
        for _ in range(2):
            torch.nn.functional.linear(x, weight)
        best = min(timed(lambda: torch.nn.functional.linear(x, weight), device) for _ in range(repeats))
    return 2 * rows * weight.numel() / best / 1e9


def kv_cache_saving(unpruned, pruned, inputs: dict, *, layer: int, removed: int, new_tokens: int) -> dict:
    """KV-cache bytes of the unpruned and the pruned model after prefill and after ``new_tokens``
    generated ones, and the saving against the theoretical one: layers >= K holding exactly
    ``removed`` positions fewer than the unpruned cache's (no bookkeeping, no padding)."""
    out = {}
    for label, tokens in (("after_prefill", 1), (f"after_{new_tokens}_new_tokens", new_tokens)):
        full = output_cache(_generate(unpruned, inputs, tokens))
        mine = output_cache(_generate(pruned, inputs, tokens))
        theory = sum(stored_bytes(c.keys, c.values) * removed / c.keys.shape[-2] for c in full.layers[layer:])
        unpruned_bytes, pruned_bytes = cache_bytes(full), cache_bytes(mine)
        saved = unpruned_bytes - pruned_bytes
        out[label] = {
            "unpruned": unpruned_bytes,
            "pruned": pruned_bytes,
            "saved": saved,
            "theoretical_saved": int(theory),
            "share_of_theory": saved / theory,
            "cached_positions": full.layers[0].keys.shape[-2],
            "stored_rows_per_layer": [stored_rows(c.keys) for c in mine.layers],
        }
    return out


# --------------------------------------------------------------------------- the ideal bound


IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw")


def kept_text_prompt(inputs: dict, kept_lengths: Sequence[int], pad_id: int, vocab: int, seed: int = 0) -> dict:
    """A text-only batch of the kept lengths, left-padded as the pruned batch is: what the
    language model of a perfect pruner would run on."""
    g = torch.Generator().manual_seed(seed)
    width = max(kept_lengths)
    ids = torch.full((len(kept_lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(kept_lengths):
        ids[b, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, width - n :] = 1
    device = inputs["input_ids"].device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def prompt_lengths(inputs: dict) -> list[int]:
    """Each sample's prompt length N_b (its attention mask's ones; without a mask, the width)."""
    if "attention_mask" in inputs:
        return [int(n) for n in inputs["attention_mask"].sum(-1).tolist()]
    return [int(inputs["input_ids"].shape[1])] * int(inputs["input_ids"].shape[0])


def kept_lengths_of(inputs: dict, entry) -> list[int]:
    """Each sample's kept length n'_b = N_b - T_b + k_b, from a report's pruning entry."""
    lengths = prompt_lengths(inputs)
    samples = entry.samples or [[entry.visual_tokens, entry.kept]] * len(lengths)
    return [int(n) - t + k for n, (t, k) in zip(lengths, samples, strict=True)]


def ideal_prefill(
    compiled, pruned, eager, inputs: dict, entry, *, runs: int, compiler: str, device: torch.device
) -> dict:
    """Median seconds of the vision tower and of the compiled unpruned prefill on text prompts of
    the kept and of the full lengths (``kept_text_prompt``), and the ideal bound they make for a
    cut at ``entry.layer`` (see the module docstring). The ``pruned`` model's prefill on ``inputs``
    is timed in the same rounds (``pruned_prefill_s``): the machine's drift between one block of
    runs and the next (10-20% on a shared CPU) then hits the ideal and the pruned model alike."""
    text_config = eager.config.get_text_config()
    pad, vocab, layers = text_config.pad_token_id or 0, text_config.vocab_size, text_config.num_hidden_layers
    kept = kept_text_prompt(inputs, kept_lengths_of(inputs, entry), pad, vocab)
    full = kept_text_prompt(inputs, prompt_lengths(inputs), pad, vocab)
    image = {k: v for k, v in inputs.items() if k in IMAGE_INPUTS}
    tower = torch.compile(eager.model.get_image_features, backend=compiler)
    with torch.no_grad():
        for _ in range(2):  # warm-up: compiles them
            tower(**image)
            _generate(compiled, kept, 1)
            _generate(compiled, full, 1)
        rounds: dict[str, list[float]] = {"vision": [], "text": [], "text_full": [], "pruned": []}
        for _ in range(runs):
            rounds["vision"].append(timed(lambda: tower(**image), device))
            rounds["text"].append(timed(lambda: _generate(compiled, kept, 1), device))
            if entry.layer:
                rounds["text_full"].append(timed(lambda: _generate(compiled, full, 1), device))
            rounds["pruned"].append(timed(lambda: _generate(pruned, inputs, 1), device))
    vision, text = statistics.median(rounds["vision"]), statistics.median(rounds["text"])
    text_full = statistics.median(rounds["text_full"]) if entry.layer else text
    before = entry.layer / layers
    ideal_text = before * text_full + (1 - before) * text
    return {
        "vision_s": vision,
        "text_prefill_s": text,
        "text_prefill_full_s": text_full,
        "layers_before_cut": entry.layer,
        "layers": layers,
        "prefill_s": vision + ideal_text,
        "pruned_prefill_s": statistics.median(rounds["pruned"]),
        "kept_lengths": [int(x) for x in kept["attention_mask"].sum(-1).tolist()],
    }


def layer0_selection_cost(model, inputs: dict, ideal: dict, *, repeats: int = 5) -> dict:
    """What K = 0's selection inputs cost beside the ideal, which knows the kept tokens for free.

    The cut at layer 0 reads layer 0's queries and keys of the unpruned prompt (ALGORITHMS.md
    section 1.3): the pass computes ``q_proj`` and ``k_proj`` over all B x N positions, then the
    layer runs again on the kept ones. The saliency reads only the instruction rows' queries (the
    text after the image) and every key those rows see, so the least any pruner selecting by the
    language model's own attention can compute is ``k_proj`` over the N positions and ``q_proj``
    over the instruction rows. Both in FLOPs and in seconds of the two projections on this device
    (median of ``repeats``), and as shares of the ideal's prefill."""
    attention = model.get_decoder().layers[0].self_attn
    q_weight, k_weight = attention.q_proj.weight.detach(), attention.k_proj.weight.detach()
    batch, length = inputs["input_ids"].shape
    image = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(image)
    after_image = image.flip(-1).cumsum(-1).flip(-1) == 0  # right of the last visual token
    instruction = int((after_image & real).sum())
    device = q_weight.device

    def projection(weight: Tensor, rows: int) -> tuple[int, float]:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=device)
        with torch.no_grad():
            torch.nn.functional.linear(x, weight)
            seconds = statistics.median(
                timed(lambda: torch.nn.functional.linear(x, weight), device) for _ in range(repeats)
            )
        return 2 * rows * weight.numel(), seconds

    q_all, k_all = projection(q_weight, batch * length), projection(k_weight, batch * length)
    q_read = projection(q_weight, instruction)
    now = (q_all[0] + k_all[0], q_all[1] + k_all[1])
    least = (q_read[0] + k_all[0], q_read[1] + k_all[1])
    return {
        "positions": batch * length,
        "instruction_rows": instruction,
        "flops": now[0],
        "seconds": now[1],
        "share_of_ideal_prefill": now[1] / ideal["prefill_s"],
        "rows_read_flops": least[0],
        "rows_read_seconds": least[1],
        "rows_read_share_of_ideal_prefill": least[1] / ideal["prefill_s"],
    }


# --------------------------------------------------------------------------- the sweep


@dataclass
class Point:
    layer: int
    keep_tokens: int


def run_bench(
    build: Callable[[], torch.nn.Module],
    inputs: dict,
    points: Sequence[Point],
    *,
    runs: int = 5,
    new_tokens: int = 8,
    base: ERAConfig | None = None,
    progress=None,
) -> dict:
    """The bench record for a model factory (each call: the same weights) and one input."""
    with recompile_headroom():  # three compiled models of one class, and their generate()s
        return _run_bench(build, inputs, points, runs=runs, new_tokens=new_tokens, base=base, progress=progress)


def _run_bench(
    build: Callable[[], torch.nn.Module],
    inputs: dict,
    points: Sequence[Point],
    *,
    runs: int,
    new_tokens: int,
    base: ERAConfig | None,
    progress,
) -> dict:
    base = base or ERAConfig()
    eager, compiled = build(), build()
    compiled.compile(backend=base.compiler)  # the same inner compiler as the pruned model
    device = next(eager.parameters()).device
    flops_unpruned = language_model_flops(eager, inputs, None)
    results: list[dict] = []
    for point in points:
        config = base.replace(layer=point.layer, keep_ratio=None, keep_tokens=point.keep_tokens)
        pruned = build()
        backend = make_era_backend(config)
        pruned.compile(backend=backend)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = interleaved_times(
            {"eager": eager, "compiled": compiled, "pruned": pruned},
            inputs,
            runs=runs,
            new_tokens=new_tokens,
            device=device,
            progress=progress,
        )
        if not backend.report.pruned:
            raise RuntimeError(f"bench: the backend did not prune at {point}:\n{backend.report}")
        site = backend.report.pruning[0]
        ideal = ideal_prefill(compiled, pruned, eager, inputs, site, runs=runs, compiler=base.compiler, device=device)
        flops_pruned = language_model_flops(eager, inputs, config)
        results.append(
            {
                "layer": point.layer,
                "keep_tokens": point.keep_tokens,
                "visual_tokens": site.visual_tokens,
                "kept": site.kept,
                "seq_len_before": site.seq_len_before,
                "seq_len_after": site.seq_len_after,
                "times": times,
                "measured_prefill_speedup": times["compiled"]["prefill_s"] / times["pruned"]["prefill_s"],
                "measured_decode_speedup": times["compiled"]["decode_s_per_token"]
                / times["pruned"]["decode_s_per_token"],
                "lm_prefill_flops": {"unpruned": flops_unpruned, "pruned": flops_pruned},
                "theoretical_prefill_speedup": flops_unpruned / flops_pruned,
                "ideal": ideal,
                "ideal_prefill_speedup": times["compiled"]["prefill_s"] / ideal["prefill_s"],
                "measured_vs_ideal": ideal["prefill_s"] / ideal["pruned_prefill_s"],  # timed in the same rounds
                "layer0_selection_cost": layer0_selection_cost(eager, inputs, ideal) if point.layer == 0 else None,
                "compile": {
                    "seconds": round(backend.report.compile_seconds, 3),
                    "pass_ms": backend.report.ms_per_pass(),
                },
                "selection_overhead": selection_overhead(pruned, inputs),
                "kv_cache": kv_cache_saving(
                    compiled,
                    pruned,
                    inputs,
                    layer=point.layer,
                    removed=site.seq_len_before - site.seq_len_after,
                    new_tokens=new_tokens,
                ),
                "peak_cuda_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "kernel": backend.report.kernel,
                "linear_gflops": {
                    "before": linear_throughput(eager, site.seq_len_before),
                    "after": linear_throughput(eager, site.seq_len_after),
                },
            }
        )
        results[-1]["prefill_speedup_vs_theory"] = (
            results[-1]["measured_prefill_speedup"] / results[-1]["theoretical_prefill_speedup"]
        )
        del pruned, backend
        gc.collect()
    return {
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "runs": runs,
        "new_tokens": new_tokens,
        "config": base.to_dict(),
        "batch": int(inputs["input_ids"].shape[0]),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "prompt_lengths": inputs["attention_mask"].sum(-1).tolist() if "attention_mask" in inputs else None,
        "points": results,
    }


def plot(record: dict, stem) -> list[str]:
    """Latency vs kept tokens, and measured vs theoretical prefill speedup; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = record["points"]
    files = []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for layer in sorted({p["layer"] for p in points}):
        row = sorted((p for p in points if p["layer"] == layer), key=lambda p: p["kept"])
        ax.plot(
            [p["kept"] for p in row],
            [1e3 * p["times"]["pruned"]["prefill_s"] for p in row],
            marker="o",
            label=f"pruned, K={layer}",
        )
    ax.axhline(
        1e3 * statistics.median(p["times"]["compiled"]["prefill_s"] for p in points),
        color="black",
        linestyle="--",
        label="compiled, unpruned",
    )
    ax.set_xlabel("visual tokens kept")
    ax.set_ylabel("prefill (ms)")
    ax.set_title(record["device"], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(f"{stem}-latency.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    theory = [p["theoretical_prefill_speedup"] for p in points]
    ax.scatter(theory, [p["measured_prefill_speedup"] for p in points], label="measured")
    if all("ideal_prefill_speedup" in p for p in points):
        ax.scatter(
            theory,
            [p["ideal_prefill_speedup"] for p in points],
            marker="x",
            color="black",
            label="ideal (compiled, kept tokens only)",
        )
    for p in points:
        ax.annotate(
            f"K={p['layer']},k={p['kept']}",
            (p["theoretical_prefill_speedup"], p["measured_prefill_speedup"]),
            fontsize=7,
        )
    top = max(theory + [p["measured_prefill_speedup"] for p in points]) * 1.1
    ax.plot([1, top], [1, top], color="gray", linestyle=":", label="measured = FLOPs bound")
    ax.set_xlabel("theoretical prefill speedup (LM FLOPs)")
    ax.set_ylabel("measured prefill speedup")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(f"{stem}-speedup.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


@contextlib.contextmanager
def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="run") as bar:
        yield lambda: bar.update(1)
