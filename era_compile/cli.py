"""``era-compile``: command-line entry points.

    era-compile demo [--model llava] [--layer 2] [--keep-ratio 0.25] [--compiler inductor]
    era-compile calibrate MODEL --out profile.json [--images DIR] [--samples 16]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from era_compile import ERAConfig, make_era_backend, zoo


def _demo(args: argparse.Namespace) -> int:
    layer = args.layer if args.layer == "auto" or not args.layer.isdigit() else int(args.layer)
    config = ERAConfig(keep_ratio=args.keep_ratio, layer=layer, profile=args.profile, strategy=args.strategy,
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


def _calibrate(args: argparse.Namespace) -> int:
    from era_compile import calibrate as cal

    if args.model in zoo.names():
        model, _ = zoo.build(args.model)
        samples = cal.zoo_samples(model, args.model, args.samples)
        name = f"zoo:{args.model}"
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not args.images:
            raise ValueError("calibrate: --images DIR is required with a checkpoint path")
        processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(args.model, local_files_only=True,
                                                            attn_implementation="sdpa").eval()
        samples = cal.image_folder_samples(processor, args.images, args.question, args.samples, model.device)
        name = args.model
    profile = cal.calibrate(model, samples, model_name=name)
    path = cal.write_profile(profile, args.out)
    print(f"{name}: visual matrix entropy per layer over {profile['samples']} samples:")
    print("  " + " ".join(f"{h:.3f}" for h in profile["entropy"]))
    print(f"Entropy Collapse Layer: K = {profile['layer']}  (written to {path})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="era-compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass did")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a tiny random-init VLM with the backend and print the report")
    demo.add_argument("--model", default="llava", choices=zoo.names())
    demo.add_argument("--layer", default=str(ERAConfig.layer), help="K, or 'auto' (with --profile, or the default)")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return {"demo": _demo, "calibrate": _calibrate}[args.command](args)
    except ValueError as e:  # a bad option value: say which, no traceback
        print(f"era-compile: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
