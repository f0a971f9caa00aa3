"""Tiny random-init models that vLLM loads from a folder, written with no network.

vLLM loads a model by path: weights, config, tokenizer and processor. This writes all four for a
LLaVA-1.5-style model (Llama text model, CLIP tower, GELU projector), shrunk in width and depth
only; the text heads are 32 wide or more because vLLM's CPU attention takes no smaller head.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from era_compile import zoo

# A character-level vocabulary: ids 0-3 special, then printable ASCII; the image token is the zoo's.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
IMAGE_TOKEN = "<image>"


def tokenizer():
    """A character-level fast tokenizer built offline, with ``<image>`` at the zoo's image token id."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    vocab[IMAGE_TOKEN] = zoo.IMAGE_TOKEN_ID
    assert len(SPECIALS + CHARS) < zoo.IMAGE_TOKEN_ID
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == zoo.IMAGE_TOKEN_ID
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

    if hidden // heads < 32:
        raise ValueError(f"hidden // heads = {hidden // heads}: vLLM's CPU attention takes heads of 32 or more")
    path = Path(path)
    torch.manual_seed(seed)
    model = zoo.tiny_llava(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, image_size=image_size, patch=patch
    )
    model.config.text_config.max_position_embeddings = 2048
    model.save_pretrained(path)
    _name_clip_tower_as_vllm_loads_it(path / "model.safetensors")
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size=crop),
        tokenizer=tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=None,
    )
    processor.save_pretrained(path)
    return path


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
