"""``era-compile``: command-line entry points.

    era-compile [--graph-breaks] demo [--model llava] [--layer 2] [--keep-ratio 0.25] [--compiler inductor]
    era-compile explain MODEL [--layer 2] [--keep-ratio 0.25] [--dump DIR]
    era-compile bench MODEL [--layers 0 2] [--keep 64 128 192] [--runs 5] [--batch 8] [--out DIR] [--fidelity]
    era-compile fidelity MODEL [--layer 2] [--keep-ratio 0.25] [--out DIR]
    era-compile calibrate MODEL --out profile.json [--images DIR] [--samples 16]
    era-compile eval shapes-vqa [--questions 1000] [--layer 2] [--out DIR]

MODEL is a zoo name or a local Hugging Face checkpoint folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

import torch

from era_compile import ERAConfig, make_era_backend, recompile_headroom, zoo


class _HeldBack(logging.Filter):
    """Dynamo's warnings during a command (the graph breaks at transformers' own checks, which a
    user cannot act on), held back so the report comes first; shown after it on request."""

    def __init__(self):
        super().__init__()
        self.records: list = []
        self.handlers = [h for name in ("torch", "torch._dynamo") for h in logging.getLogger(name).handlers]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("torch._dynamo") and record.levelno <= logging.WARNING:
            self.records.append(record)
            return False
        return True

    def __enter__(self):
        for h in self.handlers:
            h.addFilter(self)
        return self

    def __exit__(self, *exc):
        for h in self.handlers:
            h.removeFilter(self)

    def show(self, everything: bool) -> None:
        if not self.records:
            return
        if not everything:
            print(
                f"({len(self.records)} Dynamo warning(s) held back, graph breaks at transformers' own checks among "
                "them: --graph-breaks shows them)",
                file=sys.stderr,
            )
            return
        print(f"\nDynamo warnings during this command ({len(self.records)}):", file=sys.stderr)
        for record in self.records:
            print(self.handlers[0].format(record) if self.handlers else record.getMessage(), file=sys.stderr)


def _layer(text: str):
    """--layer: K as an int, or "auto" (anything else goes to ERAConfig, which names the field)."""
    return int(text) if text.isdigit() else text


def _demo(args: argparse.Namespace) -> int:
    config = _config(args, profile=args.profile, strict=args.strict)
    model, inputs = zoo.build(args.model)
    print(f"model: {zoo.ZOO[args.model].description} (random init)")
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, {zoo.num_visual_tokens(model)} of them visual")
    print(f"config: {config}")

    backend = make_era_backend(config)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        start = time.perf_counter()
        logits = compiled(**inputs).logits[:, -1]
        first = time.perf_counter() - start
        start = time.perf_counter()
        compiled(**inputs)
        second = time.perf_counter() - start
    print()
    print(backend.report)
    print()
    print(f"first call (compile + run): {first:.1f} s; second call: {second * 1e3:.1f} ms")
    top_ref, top_pruned = reference.topk(5).indices[0].tolist(), logits.topk(5).indices[0].tolist()
    print(f"next-token top-5, unpruned eager: {top_ref}")
    print(f"next-token top-5, pruned compiled: {top_pruned}")
    print("(random weights: agreement says nothing about accuracy; it shows the model still runs end to end)")
    return 0 if backend.report.pruned else 1


def _calibrate(args: argparse.Namespace) -> int:
    from era_compile import calibrate as cal
    from era_compile.loading import load

    model, processor, _ = load(args.model)
    if processor is None:
        samples = cal.zoo_samples(model, args.model, args.samples)
        name = f"zoo:{args.model}"
    else:
        if not args.images:
            raise ValueError("calibrate: --images DIR is required with a checkpoint path")
        samples = cal.image_folder_samples(processor, args.images, args.question, args.samples, model.device)
        name = args.model
    profile = cal.calibrate(model, samples, model_name=name)
    path = cal.write_profile(profile, args.out)
    print(f"{name}: visual matrix entropy per layer over {profile['samples']} samples:")
    print("  " + " ".join(f"{h:.3f}" for h in profile["entropy"]))
    print(f"Entropy Collapse Layer: K = {profile['layer']}  (written to {path})")
    png = path.with_suffix(".png")
    print(f"plot: {png}" if png.exists() else "plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
    return 0


def _config(args: argparse.Namespace, **changes) -> ERAConfig:
    options = dict(
        keep_ratio=args.keep_ratio,
        layer=args.layer,
        strategy=args.strategy,
        attention=args.attention,
        compiler=args.compiler,
    )
    return ERAConfig(**{**options, **changes})


def _explain(args: argparse.Namespace) -> int:
    from era_compile.loading import load

    if args.dump:
        os.environ["ERA_COMPILE_DUMP"] = args.dump
    model, _, inputs = load(args.model, image=args.image)
    backend = make_era_backend(_config(args))
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    report = backend.report
    print(f"{args.model}: {report.graphs} graph(s), {report.compile_seconds:.1f} s in the backend")
    print(f"{'graph':>5}  what the passes found and did")
    passes = {p["graph"]: p for p in report.passes}
    sites = {p.graph: p for p in report.pruning}
    for index in range(report.graphs):
        entry = passes.get(index)
        _explain_graph(index, entry, sites.get(index), report)
        if entry:
            times = ", ".join(
                f"{name} {value['ms']:.1f}"
                for name, value in entry.items()
                if isinstance(value, dict) and "ms" in value
            )
            print(f"{'':>5}  {entry['kind']} graph; passes (ms): {times}")
    for note in report.notes:
        print(f"note: {note}")
    if args.dump:
        print(f"graphs before and after the passes: {args.dump}")
    return 0 if report.pruned else 1


def _explain_graph(index: int, entry, site, report) -> None:
    """What the passes found in one graph and did to it, a few lines."""
    if site is not None:
        span = entry["span"]
        count = span["visual_tokens"]
        count = f"{count} visual tokens" if isinstance(count, int) else "visual tokens counted per call"
        print(
            f"{index:>5}  image merge: {count} per sample in {span['seq_len']} "
            f"positions{' (carried from an earlier graph)' if 'carried_by_input' in span else ''}"
        )
        print(
            f"{'':>5}  pruned at the input of layer {site.layer}: {site.visual_tokens} -> {site.kept} visual "
            f"tokens, sequence {site.seq_len_before} -> {site.seq_len_after}"
        )
        layers = entry["layers"]["decoder_layers"]
        rewritten = set(entry.get("attention", {}).get("layers", []))
        for layer in range(layers):
            if layer < site.layer:
                what = f"full sequence ({site.seq_len_before}), SDPA unchanged"
            elif layer in rewritten:
                lar = "" if entry["attention"].get("lar", True) else ", rectify=False: empty slots blocked, no LAR"
                what = f"{site.seq_len_after} tokens, era::biased_attention ({report.kernel}{lar})"
            else:
                what = f"{site.seq_len_after} tokens, SDPA"
            print(f"{'':>5}    layer {layer:>2}: {what}")
    elif entry and "handoff" in entry:
        print(f"{index:>5}  image merge without a decoder layer: visual mask handed to the next graph")
    elif entry and entry.get("kvcache", {}).get("compact") and entry.get("kind") == "decode":
        print(
            f"{index:>5}  decode step: layers {entry['kvcache']['compact']} attend over pruned caches, "
            "which add the anchors' bias"
        )
    else:
        reason = next((s.split(": ", 1)[1] for s in report.skipped if s.startswith(f"graph {index}:")), "unchanged")
        print(f"{index:>5}  left alone: {reason}")


def _fidelity_record(args, model, inputs) -> dict:
    from era_compile.fidelity import fidelity

    return fidelity(model, inputs, _config(args), new_tokens=args.new_tokens)


def _print_fidelity(record: dict) -> None:
    print(f"{'setting':<15} {'KL(next token)':>15} {'top-1 agreement':>16}  vision share of the last token, by layer")
    for name, r in record["settings"].items():
        shares = " ".join(
            f"{r['attention_mass'][layer]['last']['vision']:.2f}" for layer in sorted(r["attention_mass"], key=int)
        )
        print(f"{name:<15} {r['kl_next_token']:>15.4f} {r['top1_agreement']:>16.2f}  {shares}")


def _fidelity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from era_compile.fidelity import plot_attention_mass
    from era_compile.loading import load

    model, _, inputs = load(args.model, image=args.image)
    record = dict(_fidelity_record(args, model, inputs), model=args.model, config=_config(args).to_dict())
    _print_fidelity(record)
    _write_record(record, args.out, f"fidelity-{Path(args.model).name}", plot_attention_mass, "-attention.png")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from era_compile import bench
    from era_compile.loading import load

    _, _, inputs = load(args.model, image=args.image, batch=args.batch)

    def build():
        return load(args.model, image=args.image)[0]

    points = [bench.Point(layer, keep) for layer in args.layers for keep in args.keep]
    with bench.progress_bar(len(points) * args.runs, f"bench {args.model}") as tick:
        record = bench.run_bench(
            build, inputs, points, runs=args.runs, new_tokens=args.new_tokens, base=_config(args), progress=tick
        )
    record["model"] = args.model
    print(
        f"{'K':>3} {'kept':>5} {'prefill ms (eager / compiled / pruned / ideal)':>48} {'speedup':>8} "
        f"{'FLOPs bound':>11} {'vs ideal':>8} {'decode ms/token (compiled / pruned)':>36} {'select+recycle':>15}"
    )
    for p in record["points"]:
        t = p["times"]
        print(
            f"{p['layer']:>3} {p['kept']:>5} {1e3 * t['eager']['prefill_s']:>14.1f}"
            f" / {1e3 * t['compiled']['prefill_s']:>9.1f} / {1e3 * t['pruned']['prefill_s']:>9.1f}"
            f" / {1e3 * p['ideal']['prefill_s']:>7.1f} "
            f"{p['measured_prefill_speedup']:>7.2f}x {p['theoretical_prefill_speedup']:>10.2f}x "
            f"{p['measured_vs_ideal']:>8.2f} {1e3 * t['compiled']['decode_s_per_token']:>21.1f} / "
            f"{1e3 * t['pruned']['decode_s_per_token']:>9.1f} {100 * p['selection_overhead']['fraction']:>14.1f}%"
        )
    if args.fidelity:
        model, _, _ = load(args.model, image=args.image)
        record["fidelity"] = _fidelity_record(args, model, inputs)
        _print_fidelity(record["fidelity"])
    batch = f"-batch{args.batch}" if args.batch > 1 else ""
    _write_record(
        record,
        args.out,
        f"{Path(args.model).name}{batch}-{bench.device_slug(record['device_type'], record['device'])}",
        bench.plot,
    )
    return 0


def _serve_bench(args: argparse.Namespace) -> int:
    from era_compile import bench, serve_bench

    with bench.progress_bar((1 + args.replays) * args.requests, f"serve-bench {args.model}") as tick:
        record = serve_bench.run_serve_bench(
            args.model,
            lambda: zoo.build(args.model, seed=args.seed)[0],
            requests=args.requests,
            max_batch=args.max_batch,
            new_tokens=args.new_tokens,
            seed=args.seed,
            replays=args.replays,
            config=_config(args),
            progress=tick,
        )
    print(serve_bench.table(record))
    print(serve_bench.request_table(record))
    _write_record(
        record,
        args.out,
        f"serve-{args.model}-{bench.device_slug(record['device_type'], record['device'])}",
        serve_bench.plot,
    )
    if record["pruned_share"] not in (None, 1.0):
        print(
            f"era-compile: only {100 * record['pruned_share']:.0f}% of the image requests were pruned", file=sys.stderr
        )
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from era_compile import bench
    from era_compile.shapes_vqa import evaluate
    from era_compile.shapes_vqa.model import WEIGHTS, load_model

    model, tokenizer = load_model(args.weights or WEIGHTS)
    total = 1 + len(args.strategies) * len(args.settings) * len(args.ratios)
    with bench.progress_bar(total, "eval shapes-vqa") as tick:
        record = evaluate.run_eval(
            model,
            tokenizer,
            questions=args.questions,
            layer=args.layer,
            strategies=args.strategies,
            settings=args.settings,
            ratios=args.ratios,
            compiler=args.compiler,
            progress=tick,
        )
    record["benchmark"] = args.benchmark
    print(f"accuracy (%) on {record['questions']} shapes-vqa test questions, pruning at layer {record['layer']}:")
    print(evaluate.table(record))
    _write_record(record, args.out, f"eval-{args.benchmark}-k{args.layer}", evaluate.plot, ".png")
    return 0


def _write_record(record: dict, out: str, name: str, draw, plot_suffix: str = "") -> None:
    """``<out>/<name>.json``, then the plots ``draw(record, <out>/<name><plot_suffix>)`` writes."""
    import json
    from pathlib import Path

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / name
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {stem}.json")
    _plot(draw, record, f"{stem}{plot_suffix}")


def _plot(draw, *args) -> None:
    """Draw the PNG plots, or say why not: matplotlib is an optional extra."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return
    written = draw(*args)
    print("wrote " + ", ".join(written if isinstance(written, list) else [args[-1]]))


def _add_model_options(p: argparse.ArgumentParser, keep_ratio=0.25, compiler="eager") -> None:
    p.add_argument("model", help=f"a zoo name ({', '.join(zoo.names())}) or a local checkpoint folder")
    p.add_argument("--image", help="an image file for a checkpoint (default: a plain gray image)")
    p.add_argument("--layer", type=_layer, default=ERAConfig.layer, help="K, or 'auto'")
    p.add_argument("--keep-ratio", type=float, default=keep_ratio)
    p.add_argument("--strategy", default=ERAConfig.strategy)
    p.add_argument("--attention", default=ERAConfig.attention)
    p.add_argument("--compiler", default=compiler, choices=("inductor", "eager"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="era-compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass did")
    parser.add_argument(
        "--graph-breaks",
        action="store_true",
        help="show Dynamo's warnings (graph breaks) after the output; TORCH_LOGS shows them as usual",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a tiny random-init VLM with the backend and print the report")
    demo.add_argument("--model", default="llava", choices=zoo.names())
    demo.add_argument(
        "--layer", type=_layer, default=ERAConfig.layer, help="K, or 'auto' (with --profile, or the default)"
    )
    demo.add_argument("--profile", help="a calibration profile from `era-compile calibrate` (with --layer auto)")
    demo.add_argument("--keep-ratio", type=float, default=0.25)
    demo.add_argument("--strategy", default=ERAConfig.strategy)
    demo.add_argument("--compiler", default=ERAConfig.compiler, choices=("inductor", "eager"))
    demo.add_argument("--attention", default=ERAConfig.attention)
    demo.add_argument("--strict", action="store_true")
    cal = sub.add_parser("calibrate", help="find the Entropy Collapse Layer of a model: a profile for layer='auto'")
    cal.add_argument("model", help=f"a zoo name ({', '.join(zoo.names())}) or a local checkpoint path")
    cal.add_argument("--out", required=True, help="profile JSON to write (a PNG plot goes beside it)")
    cal.add_argument("--images", help="a folder of calibration images (with a checkpoint path)")
    cal.add_argument("--samples", type=int, default=16)
    cal.add_argument("--question", default="Describe this image in detail.")
    explain = sub.add_parser("explain", help="compile, run one input, show what was found and rewritten")
    _add_model_options(explain)
    explain.add_argument("--dump", help="write every graph before and after the passes into this folder")
    fid = sub.add_parser("fidelity", help="KL, top-1 agreement and attention mass per layer against the unpruned model")
    _add_model_options(fid)
    fid.add_argument("--new-tokens", type=int, default=16)
    fid.add_argument("--out", default=".")
    bench_p = sub.add_parser("bench", help="prefill/decode time, FLOPs and overhead: compiled unpruned vs pruned")
    _add_model_options(bench_p, compiler="inductor")
    bench_p.add_argument("--layers", type=int, nargs="+", default=[2])
    bench_p.add_argument("--keep", type=int, nargs="+", default=[64], help="visual tokens kept (sweep)")
    bench_p.add_argument("--runs", type=int, default=5)
    bench_p.add_argument("--new-tokens", type=int, default=8)
    bench_p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="a left-padded batch of this many prompts of different lengths (zoo LLaVA models)",
    )
    bench_p.add_argument("--out", default="benchmarks/results")
    bench_p.add_argument("--fidelity", action="store_true", help="also measure fidelity (see the fidelity command)")
    serve = sub.add_parser(
        "serve-bench",
        help="a seeded request stream through generate(): eager vs compiled "
        "vs pruned (TTFT, tokens/s, compiles, KV cache)",
    )
    _add_model_options(serve, compiler="inductor")
    serve.add_argument("--requests", type=int, default=24)
    serve.add_argument("--max-batch", type=int, default=8, help="each request a batch of 1 to this many prompts")
    serve.add_argument("--new-tokens", type=int, default=8)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument(
        "--replays", type=int, default=1, help="warm passes over the stream; each request's median TTFT is recorded"
    )
    serve.add_argument("--out", default="benchmarks/results")
    from era_compile.shapes_vqa import evaluate

    ev = sub.add_parser("eval", help="accuracy vs kept tokens per strategy on a trained model (shapes-vqa)")
    ev.add_argument("benchmark", choices=("shapes-vqa",))
    ev.add_argument("--questions", type=int, default=1000, help="the first N test questions")
    ev.add_argument("--layer", type=int, default=2, help="K: the layer pruning happens at")
    ev.add_argument("--strategies", nargs="+", default=list(evaluate.STRATEGIES))
    ev.add_argument("--settings", nargs="+", default=list(evaluate.SETTINGS), choices=list(evaluate.SETTINGS))
    ev.add_argument("--ratios", type=float, nargs="+", default=list(evaluate.KEEP_RATIOS), help="keep ratios")
    ev.add_argument(
        "--compiler",
        default="eager",
        choices=("inductor", "eager"),
        help="the inner compiler after the era passes (eager: 60 configurations compile in minutes)",
    )
    ev.add_argument("--weights", help="a trained model folder (default: the one shipped in the package)")
    ev.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    command = {
        "demo": _demo,
        "calibrate": _calibrate,
        "explain": _explain,
        "bench": _bench,
        "fidelity": _fidelity,
        "eval": _eval,
        "serve-bench": _serve_bench,
    }[args.command]
    held = _HeldBack() if not os.environ.get("TORCH_LOGS") else contextlib.nullcontext()
    try:
        with held, recompile_headroom():  # a command meets many prompt shapes in a process of its own
            return command(args)
    except ValueError as e:  # a bad option value or MODEL: say which, no traceback
        print(f"era-compile: {e}", file=sys.stderr)
        return 2
    finally:
        if isinstance(held, _HeldBack):
            held.show(args.graph_breaks)


if __name__ == "__main__":
    sys.exit(main())
