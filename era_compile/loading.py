"""MODEL arguments of the CLI and the examples: a zoo name, or a local Hugging Face checkpoint.

    model, processor, inputs = load("llava")                              # tiny zoo model, its prompt
    model, processor, inputs = load("/models/llava-1.5-7b-hf", image="cat.jpg")

A checkpoint loads with ``local_files_only=True`` and SDPA attention; its prompt is the
processor's chat template around one image (or a video's frames) and the question. A path that
holds no vision-language model is refused with a message saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from era_compile import zoo


class ModelLoadError(ValueError):
    """MODEL is neither a zoo name nor a local vision-language checkpoint."""


def load(
    model: str,
    *,
    image: str | None = None,
    frames: Sequence[str] | None = None,
    question: str = "What is in this image?",
    seed: int = 0,
    batch: int = 1,
):
    """(model, processor or None, inputs) for a zoo name or a checkpoint path. ``batch`` > 1: a
    left-padded batch of that many prompts of different lengths (the zoo's LLaVA models)."""
    if model in zoo.names():
        if batch == 1:
            built, inputs = zoo.build(model, seed=seed)
        elif model in zoo.paddable_names():
            built, inputs = zoo.build(model, seed=seed, batch=batch, left_pad="spread")
        else:
            raise ModelLoadError(
                f"--batch {batch}: zoo model {model!r} has no left-padded batch of different "
                f"prompt lengths (models that do: {', '.join(zoo.paddable_names())})"
            )
        return built, None, inputs
    if batch != 1:
        raise ModelLoadError(f"--batch {batch}: a checkpoint runs its one prompt (batch 1)")
    path = Path(model)
    if not path.is_dir():
        raise ModelLoadError(
            f"MODEL {model!r} is neither a zoo model ({', '.join(zoo.names())}) nor a local checkpoint folder"
        )
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # missing, unreadable or invalid: in every case not a model we can load
        raise ModelLoadError(f"MODEL {model!r} holds no loadable Hugging Face config: {e}") from e
    if getattr(config, "vision_config", None) is None:
        raise ModelLoadError(
            f"MODEL {model!r} is a {type(config).__name__}, not a vision-language model "
            "(its config has no vision_config)"
        )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    cuda = torch.cuda.is_available()
    loaded = AutoModelForImageTextToText.from_pretrained(
        path,
        local_files_only=True,
        attn_implementation="sdpa",
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map="auto" if cuda else None,
    ).eval()
    return loaded, processor, _prompt(processor, question, image, frames).to(loaded.device)


def _prompt(processor, question: str, image: str | None, frames: Sequence[str] | None):
    from PIL import Image

    media = "video" if frames else "image"
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    if frames:
        return processor(videos=[[Image.open(f).convert("RGB") for f in frames]], text=prompt, return_tensors="pt")
    picture = Image.open(image).convert("RGB") if image else Image.new("RGB", (336, 336), (127, 127, 127))
    return processor(images=picture, text=prompt, return_tensors="pt")
