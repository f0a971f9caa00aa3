"""Tiny random-init models that vLLM loads from a folder, written with no network.

vLLM loads a model by path: weights, config, tokenizer and processor. This writes all four for a
LLaVA-1.5-style model (Llama text model, CLIP tower, GELU projector), shrunk in width and depth
only; the text heads are 32 wide or more because vLLM's CPU attention takes no smaller head.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from era_compile import zoo

# A character-level vocabulary: ids 0-3 special, then printable ASCII; the image token is the zoo's.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
IMAGE_TOKEN = "<image>"


def tokenizer(specials: dict[str, int] | None = None):
    """A character-level fast tokenizer built offline, with each special token (by default ``<image>``
    alone) at the id given, above the characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = specials or {IMAGE_TOKEN: zoo.IMAGE_TOKEN_ID}
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) <= min(specials.values())
    vocab |= specials
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    assert all(tok.convert_tokens_to_ids(name) == i for name, i in specials.items())
    return tok


def write_llava(
    path: str | Path,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 112,
    patch: int = 14,
    seed: int = 0,
) -> Path:
    """A LLaVA-1.5-style model vLLM loads from ``path``: ``(image_size / patch)**2`` visual tokens per
    image (64 by default), a ``hidden``-wide Llama with ``hidden // heads``-wide heads."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    _check_head(hidden, heads)
    path = Path(path)
    torch.manual_seed(seed)
    model = zoo.tiny_llava(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, image_size=image_size, patch=patch
    )
    model.config.text_config.max_position_embeddings = 2048
    return _save_llava_family(path, model, LlavaProcessor, CLIPImageProcessor(**_square(image_size)), patch)


def write_llava_next(
    path: str | Path,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 56,
    patch: int = 14,
    seed: int = 0,
) -> Path:
    """A LLaVA-NeXT-style model vLLM loads from ``path``: anyres (a base view plus crops picked from
    three grid pinpoints by the image's aspect ratio, with a newline token closing each row), so an
    image's token count depends on its size: 16 to 56 visual tokens at the defaults."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    _check_head(hidden, heads)
    path = Path(path)
    torch.manual_seed(seed)
    model = zoo.tiny_llava_next(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, image_size=image_size, patch=patch
    )
    image_processor = LlavaNextImageProcessor(
        **_square(image_size), image_grid_pinpoints=model.config.image_grid_pinpoints
    )
    return _save_llava_family(path, model, LlavaNextProcessor, image_processor, patch)


def _square(side: int) -> dict:
    return {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}


def _save_llava_family(path: Path, model: Any, processor_class: Any, image_processor: Any, patch: int) -> Path:
    """Weights (the CLIP tower named as vLLM loads it), config, tokenizer and processor of a LLaVA-family model."""
    model.save_pretrained(path)
    _name_clip_tower_as_vllm_loads_it(path / "model.safetensors")
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=None,
    )
    processor.save_pretrained(path)
    return path


def _check_head(hidden: int, heads: int) -> int:
    if hidden // heads < 32:
        raise ValueError(f"hidden // heads = {hidden // heads}: vLLM's CPU attention takes heads of 32 or more")
    return hidden // heads


def _name_clip_tower_as_vllm_loads_it(weights: Path) -> None:
    """transformers 5 saves LLaVA's CLIP tower as ``vision_tower.embeddings...``; vLLM's CLIP
    loads ``vision_tower.vision_model.embeddings...`` (the layout of the published checkpoints)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name[len("vision_tower.") :]
        renamed[name] = tensor
    save_file(renamed, weights, metadata={"format": "pt"})


QWEN_SPECIALS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id"}
QWEN_SPECIALS |= {"<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}


def write_qwen2_vl(
    path: str | Path,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    patch: int = 14,
    max_image_side: int = 224,
    seed: int = 0,
) -> Path:
    """A Qwen2-VL-style model vLLM loads from ``path``: M-RoPE text model with ``hidden // heads``-wide
    heads (the M-RoPE sections scaled to the head), its ViT with 2 x 2 patch merging, and a processor
    that keeps images within ``max_image_side``**2 pixels (up to 64 visual tokens at the defaults)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    head = _check_head(hidden, heads)
    path = Path(path)
    torch.manual_seed(seed)
    half = head // 2  # M-RoPE splits a head's rotary frequencies into (t, h, w) sections
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text: dict[str, Any] = {**zoo._QWEN_TEXT, "hidden_size": hidden, "intermediate_size": 2 * hidden}
    text |= {"num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": sections}
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=patch)
    vision |= dict(spatial_merge_size=2, temporal_patch_size=2)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **zoo.QWEN_TOKENS))
    zoo._sharpen_attention(model.eval())
    model.save_pretrained(path)
    tok = tokenizer({name: zoo.QWEN_TOKENS[field] for name, field in QWEN_SPECIALS.items()})
    pixels = dict(min_pixels=(2 * patch) ** 2, max_pixels=max_image_side**2)
    sizes = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, **sizes),
        video_processor=Qwen2VLVideoProcessor(**pixels, **sizes),
        tokenizer=tok,
        chat_template=None,
    )
    processor.save_pretrained(path)
    return path
