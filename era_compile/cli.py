"""``era-compile``: command-line entry points.

    era-compile demo [--model llava] [--layer 2] [--keep-ratio 0.25] [--compiler inductor]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from era_compile import ERAConfig, make_era_backend, zoo


def _demo(args: argparse.Namespace) -> int:
    config = ERAConfig(keep_ratio=args.keep_ratio, layer=args.layer, strategy=args.strategy,
                       compiler=args.compiler, attention=args.attention, strict=args.strict)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="era-compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass did")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a tiny random-init VLM with the backend and print the report")
    demo.add_argument("--model", default="llava", choices=zoo.names())
    demo.add_argument("--layer", type=int, default=ERAConfig.layer)
    demo.add_argument("--keep-ratio", type=float, default=0.25)
    demo.add_argument("--strategy", default=ERAConfig.strategy)
    demo.add_argument("--compiler", default=ERAConfig.compiler, choices=("inductor", "eager"))
    demo.add_argument("--attention", default=ERAConfig.attention)
    demo.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return {"demo": _demo}[args.command](args)
    except ValueError as e:  # a bad option value: say which, no traceback
        print(f"era-compile: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
