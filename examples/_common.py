"""Shared by the example scripts: load a local checkpoint (or a zoo model), compile, generate."""

from __future__ import annotations

import argparse

import torch

from era_compile import ERAConfig, make_era_backend
from era_compile.loading import load as era_load


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", help="a local Hugging Face checkpoint; without it, a tiny random zoo model")
    parser.add_argument("--image", help="an image file (with --model-path)")
    parser.add_argument("--frames", nargs="+", help="a video as its frames' image files, in order (with --model-path)")
    parser.add_argument("--question", default="What is in this image?")
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"))
    return parser.parse_args()


def load(args, zoo_name: str, media: str = "image"):
    """(model, processor or None, inputs): the checkpoint at --model-path, or the zoo model.
    ``media``: "image" (one --image) or "video" (--frames, one image file per frame)."""
    if args.model_path and not (args.image if media == "image" else args.frames):
        raise SystemExit(f"--{'image' if media == 'image' else 'frames'} is required with --model-path")
    return era_load(
        args.model_path or zoo_name,
        image=args.image,
        frames=args.frames if media == "video" else None,
        question=args.question,
    )


def run(description: str, zoo_name: str, media: str = "image") -> None:
    args = parse_args(description)
    model, processor, inputs = load(args, zoo_name, media)
    backend = make_era_backend(ERAConfig(keep_ratio=args.keep_ratio, layer=args.layer, compiler=args.compiler))
    model.compile(backend=backend)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    if processor is not None:
        print(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])
    else:
        print(f"generated token ids (random weights): {new_tokens[0].tolist()}")
    print(backend.report)
