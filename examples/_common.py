"""Shared by the example scripts: load a local checkpoint (or a zoo model), compile, generate."""

from __future__ import annotations

import argparse

import torch

from era_compile import ERAConfig, make_era_backend, zoo


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
    if not args.model_path:
        model, inputs = zoo.build(zoo_name)
        return model, None, inputs
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    given = args.image if media == "image" else args.frames
    if not given:
        raise SystemExit(f"--{'image' if media == 'image' else 'frames'} is required with --model-path")
    processor = AutoProcessor.from_pretrained(args.model_path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model_path, local_files_only=True, attn_implementation="sdpa",
        dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        device_map="auto" if torch.cuda.is_available() else None).eval()
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    if media == "image":
        inputs = processor(images=Image.open(args.image).convert("RGB"), text=prompt, return_tensors="pt")
    else:
        frames = [Image.open(f).convert("RGB") for f in args.frames]
        inputs = processor(videos=[frames], text=prompt, return_tensors="pt")
    return model, processor, inputs.to(model.device)


def run(description: str, zoo_name: str, media: str = "image") -> None:
    args = parse_args(description)
    model, processor, inputs = load(args, zoo_name, media)
    backend = make_era_backend(ERAConfig(keep_ratio=args.keep_ratio, layer=args.layer, compiler=args.compiler))
    model.compile(backend=backend)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    if processor is not None:
        print(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])
    else:
        print(f"generated token ids (random weights): {new_tokens[0].tolist()}")
    print(backend.report)
