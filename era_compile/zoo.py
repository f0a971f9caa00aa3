"""Tiny random-init vision-language models built from configs: no weights to download.

Each entry builds a Hugging Face model of a supported architecture (same classes, same
graph shapes as the real checkpoints, just small) and a prompt with one image:

    model, inputs = zoo.build("llava")
    model(**inputs)

The demo and the tests use these; real checkpoints load from a local path instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

IMAGE_TOKEN_ID = 250  # inside the tiny vocabulary, never produced by the text sampler below
VIDEO_TOKEN_ID = 251
TEXT_VOCAB = 240  # text tokens are drawn from [3, TEXT_VOCAB)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    make_model: Callable[[], torch.nn.Module]
    make_inputs: Callable[..., dict]
    benchmark: bool = False  # a benchmark shape, not another architecture (not in the support matrix)


def llava_config(
    text: dict, vision: dict, image_token_id: int = IMAGE_TOKEN_ID, vision_feature_layer: int = -2, **extra
):
    """A ``LlavaConfig`` as LLaVA-1.5 has it (Llama text model, CLIP tower, GELU projector, SDPA
    attention), from the fields of the two towers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(**vision),
        image_token_id=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        **extra,
    )
    config._attn_implementation = "sdpa"
    return config


def llama_text(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int = 0) -> dict:
    """The tiny Llama text model of the LLaVA family, in the zoo's 256-token vocabulary."""
    return dict(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def small_clip(image_size: int, patch: int) -> dict:
    """A small CLIP tower: the language model is what pruning speeds up."""
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )


def tiny_llava(
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 48,
    patch: int = 8,
    intermediate: int = 0,
    sharpen: bool = True,
):
    from transformers import LlavaForConditionalGeneration

    config = llava_config(
        text=llama_text(hidden, layers, heads, kv_heads, intermediate), vision=small_clip(image_size, patch)
    )
    model = LlavaForConditionalGeneration(config).eval()
    if sharpen:
        _sharpen_attention(model)
    return model


def _llava_bench():
    """LLaVA-1.5's sequence shape on a CPU budget: 576 visual tokens (336 px, 14 px patches),
    an 8-layer, 1024-wide Llama with 16 heads (MHA, as LLaVA-1.5), random weights."""
    return tiny_llava(
        hidden=1024, layers=8, heads=16, kv_heads=16, image_size=336, patch=14, intermediate=2816, sharpen=False
    )


def _llava_7b_shape():
    """LLaVA-1.5-7B's exact shapes: CLIP ViT-L/14-336 (24 x 1024) and a 32-layer, 4096-wide Llama
    (32 heads, MLP 11008, vocabulary 32064), random weights created on the GPU in bf16."""
    from transformers import LlavaForConditionalGeneration

    if not torch.cuda.is_available():
        raise ValueError("zoo model 'llava-7b-shape' needs a CUDA device (7B parameters, created on the GPU in bf16)")
    config = llava_config(
        text=dict(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # created in bf16: a float32 copy would be 28 GB
    try:
        with torch.device("cuda"):
            return LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)


def _llava_bench_inputs(model, **kwargs) -> dict:
    """About 60 text tokens around the image, as a LLaVA-1.5 chat prompt has (system + question)."""
    kwargs.setdefault("prefix", 35)
    kwargs.setdefault("suffix", 25)
    return _llava_inputs(model, **kwargs)


def _left_padded(
    rows: Sequence[torch.Tensor], pad_id: int, masks: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one batch, left-padded (attention_mask 0), as tokenizers pad
    for generation: (input_ids, attention_mask)."""
    masks = list(masks) or [torch.ones(len(r), dtype=torch.long) for r in rows]
    width = max(len(r) for r in rows)
    ids = [torch.cat([torch.full((width - len(r),), pad_id), r]) for r in rows]
    att = [torch.cat([torch.zeros(width - len(m), dtype=torch.long), m]) for m in masks]
    return torch.stack(ids), torch.stack(att)


def _per_sample(value, batch: int, name: str) -> list:
    """``value`` for every sample, or, given as a list, one per sample (a ragged batch)."""
    values = list(value) if isinstance(value, list) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"{name}: {len(values)} values for a batch of {batch}")
    return values


def _llava_inputs(
    model,
    *,
    batch: int = 1,
    prefix: int = 5,
    suffix: int = 7,
    images=1,
    left_pad: Sequence[int] | str = (),
    seed: int = 0,
) -> dict:
    """Per sample: ``prefix`` text tokens, then for each of ``images`` images (one count for every
    sample, or a list of one per sample: a ragged batch) its placeholder tokens followed by ``suffix`` text
    tokens. ``left_pad[b]`` shortens sample b's last text run by that many tokens and pads it on
    the left (attention_mask 0), as tokenizers do for generation; samples of other lengths are
    left-padded to the longest. ``left_pad="spread"``: prompts of lengths spread evenly over
    ``suffix`` tokens (a serving batch)."""
    vcfg = model.config.vision_config
    num_visual = (vcfg.image_size // vcfg.patch_size) ** 2
    pad_id = model.config.text_config.pad_token_id
    counts = _per_sample(images, batch, "images")
    if isinstance(left_pad, str):
        if left_pad != "spread":
            raise ValueError(f"left_pad={left_pad!r}: a pad per sample, or 'spread'")
        left_pad = [round(b * (suffix - 1) / max(1, batch - 1)) for b in range(batch)]
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for b in range(batch):
        pad = left_pad[b] if b < len(left_pad) else 0
        if not 0 <= pad < suffix:
            raise ValueError(f"left_pad[{b}]={pad} must be in [0, suffix={suffix})")
        parts = [torch.randint(3, TEXT_VOCAB, (prefix,), generator=g)]
        for i in range(counts[b]):
            text = suffix - pad if i == counts[b] - 1 else suffix
            parts += [torch.full((num_visual,), IMAGE_TOKEN_ID), torch.randint(3, TEXT_VOCAB, (text,), generator=g)]
        if counts[b] == 0:
            parts.append(torch.randint(3, TEXT_VOCAB, (suffix - pad,), generator=g))
        row = torch.cat(parts)
        rows.append(torch.cat([torch.full((pad,), pad_id), row]))
        masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(len(row), dtype=torch.long)]))
    input_ids, attention_mask = _left_padded(rows, pad_id, masks)
    pixel_values = torch.randn(sum(counts), 3, vcfg.image_size, vcfg.image_size, generator=g)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": attention_mask}


def tiny_llava_next(
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 32,
    patch: int = 8,
    pinpoints: list[list[int]] | None = None,
):
    """LLaVA-NeXT's anyres layout: a base view plus the crops of the grid pinpoint nearest the image's
    aspect ratio (by default 1 x 2, 2 x 1 and 2 x 2 tiles of ``image_size``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    side = image_size
    config = LlavaNextConfig(
        text_config=LlamaConfig(**{**llama_text(hidden, layers, heads, kv_heads), "max_position_embeddings": 2048}),
        vision_config=CLIPVisionConfig(**small_clip(image_size, patch)),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=pinpoints or [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        vision_feature_layer=-2,
    )
    config._attn_implementation = "sdpa"
    model = LlavaNextForConditionalGeneration(config).eval()
    _sharpen_attention(model)
    return model


def _llava_next_inputs(
    model, *, batch: int = 1, prefix: int = 5, suffix: int = 7, seed: int = 0, image_size=(40, 60)
) -> dict:
    """Anyres: a base view plus crops of one ``image_size`` image per sample (a list: one size per
    sample, other aspect ratios, so other token counts); the image-token count (crops and
    image_newline rows) comes from the model itself, as a processor computes it. Samples of
    other lengths are left-padded to the longest."""
    vcfg = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([list(size) for size in _per_sample(image_size, batch, "image_size")])
    pixel_values = torch.randn(batch, 5, 3, vcfg.image_size, vcfg.image_size, generator=g)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes)
    counts = [f.shape[0] for f in features.pooler_output]
    rows = [
        torch.cat(
            [
                torch.randint(3, TEXT_VOCAB, (prefix,), generator=g),
                torch.full((n,), IMAGE_TOKEN_ID),
                torch.randint(3, TEXT_VOCAB, (suffix,), generator=g),
            ]
        )
        for n in counts
    ]
    input_ids, attention_mask = _left_padded(rows, model.config.text_config.pad_token_id)
    return {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "image_sizes": sizes,
        "attention_mask": attention_mask,
    }


QWEN_TOKENS = dict(
    image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=252, vision_end_token_id=253
)
_QWEN_TEXT = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
)


def _tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=_QWEN_TEXT,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        **QWEN_TOKENS,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _sharpen_attention(model)
    return model


def _qwen2_vl(text: dict, sharpen: bool = True):
    """A Qwen2-VL with the given text model and a small vision tower (2 blocks, 2 x 2 merger)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=text["hidden_size"],
            num_heads=2,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **QWEN_TOKENS,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2VLForConditionalGeneration(config).eval()
    if sharpen:
        _sharpen_attention(model)
    return model


def _tiny_qwen2_vl():
    return _qwen2_vl(_QWEN_TEXT)


def _qwen2_vl_serve():
    """serve-bench's traffic model: Qwen2-VL whose language model has a text model's width
    (8 layers x 1024, 16 heads of 64 with 4 KV heads, MLP 2816), so attention and MLP cost what
    they do in use; the vision tower stays small (every pruner pays it alike)."""
    rope = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0}  # head dim 64
    text = {**_QWEN_TEXT, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8}
    text.update(num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=16384, rope_parameters=rope)
    return _qwen2_vl(text, sharpen=False)


def _qwen_inputs(model, *, batch: int = 1, prefix: int = 5, suffix: int = 7, seed: int = 0, grid=(1, 12, 12)) -> dict:
    """Per sample: text, <|vision_start|>, the image's pad tokens (t*h*w / merge^2 of them),
    <|vision_end|>, text; flattened patches and ``image_grid_thw`` as Qwen's processor gives them.
    ``grid`` is one (t, h, w) for every sample or a list of one per sample (other image sizes);
    samples of other lengths are left-padded to the longest."""
    vcfg = model.config.vision_config
    merge = vcfg.spatial_merge_size
    grids = _per_sample(grid, batch, "grid")
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.cat(
            [
                torch.randint(3, TEXT_VOCAB, (prefix,), generator=g),
                torch.tensor([QWEN_TOKENS["vision_start_token_id"]]),
                torch.full((t * h * w // (merge * merge),), IMAGE_TOKEN_ID),
                torch.tensor([QWEN_TOKENS["vision_end_token_id"]]),
                torch.randint(3, TEXT_VOCAB, (suffix,), generator=g),
            ]
        )
        for t, h, w in grids
    ]
    input_ids, attention_mask = _left_padded(rows, model.config.text_config.pad_token_id)
    patches = sum(t * h * w for t, h, w in grids)
    return {
        "input_ids": input_ids,
        "pixel_values": torch.randn(patches, patch_dim, generator=g),
        "image_grid_thw": torch.tensor([list(grid) for grid in grids]),
        "attention_mask": attention_mask,
        # what the processor returns beside input_ids: 1 marks image tokens (M-RoPE needs it)
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN_ID).long(),
    }


def _tiny_llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        text_config=dict(
            _QWEN_TEXT, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=48,
            patch_size=8,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[48, 48], [48, 96], [96, 48]],
    )
    config._attn_implementation = "sdpa"
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _sharpen_attention(model)
    return model


def _onevision_video_inputs(
    model, *, batch: int = 1, prefix: int = 5, suffix: int = 7, frames: int = 4, seed: int = 0
) -> dict:
    """Per sample a ``frames``-frame video: each frame's patches pooled 2x2, then one
    image_newline row after the last frame, as LLaVA-OneVision's video path packs them."""
    vcfg = model.config.vision_config
    side = -(-(vcfg.image_size // vcfg.patch_size) // 2)  # ceil: the 2x2 bilinear pooling
    num_visual = frames * side * side + 1
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.cat(
            [
                torch.randint(3, TEXT_VOCAB, (prefix,), generator=g),
                torch.full((num_visual,), VIDEO_TOKEN_ID),
                torch.randint(3, TEXT_VOCAB, (suffix,), generator=g),
            ]
        )
        for _ in range(batch)
    ]
    input_ids = torch.stack(rows)
    videos = torch.randn(batch, frames, 3, vcfg.image_size, vcfg.image_size, generator=g)
    return {"input_ids": input_ids, "pixel_values_videos": videos, "attention_mask": torch.ones_like(input_ids)}


def _sharpen_attention(model) -> None:
    """Random init gives near-uniform attention; a larger spread makes the saliency (and so the
    selection) clearly non-degenerate in tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)


def num_visual_tokens(model) -> int:
    vcfg = model.config.vision_config
    return (vcfg.image_size // vcfg.patch_size) ** 2


ZOO: dict[str, ZooEntry] = {
    "llava": ZooEntry(
        "llava",
        "tiny LLaVA-1.5 (CLIP 2x32, Llama 4x64, GQA 4:2, 36 visual tokens)",
        tiny_llava,
        _llava_inputs,
    ),
    "llava-bench": ZooEntry(
        "llava-bench",
        "LLaVA-shaped CPU benchmark (CLIP 336/14: 576 visual tokens; Llama 8x1024, 16 heads; ~60 text tokens)",
        _llava_bench,
        _llava_bench_inputs,
        benchmark=True,
    ),
    "llava-7b-shape": ZooEntry(
        "llava-7b-shape",
        "LLaVA-1.5-7B's exact shapes, random bf16 weights on a CUDA GPU (CLIP ViT-L/14-336; Llama 32x4096)",
        _llava_7b_shape,
        _llava_bench_inputs,
        benchmark=True,
    ),
    "llava-next": ZooEntry(
        "llava-next",
        "tiny LLaVA-NeXT (anyres: base view + 4 crops, image_newline rows; Llama 4x64)",
        tiny_llava_next,
        _llava_next_inputs,
    ),
    "qwen2-vl": ZooEntry(
        "qwen2-vl",
        "tiny Qwen2-VL (M-RoPE positions, 2x2 patch merger; Qwen2 4x64)",
        _tiny_qwen2_vl,
        _qwen_inputs,
    ),
    "qwen2-vl-serve": ZooEntry(
        "qwen2-vl-serve",
        "Qwen2-VL for serve-bench traffic (Qwen2 8x1024, 16 heads, 4 KV heads; images of 64 to 1,024 visual tokens)",
        _qwen2_vl_serve,
        _qwen_inputs,
        benchmark=True,
    ),
    "qwen2.5-vl": ZooEntry(
        "qwen2.5-vl",
        "tiny Qwen2.5-VL (M-RoPE positions, windowed ViT, 2x2 patch merger; Qwen2 4x64)",
        _tiny_qwen2_5_vl,
        _qwen_inputs,
    ),
    "llava-onevision": ZooEntry(
        "llava-onevision",
        "tiny LLaVA-OneVision with a 4-frame video (SigLIP 2x32, 2x2 pooled frames + image_newline; Qwen2 4x64)",
        _tiny_llava_onevision,
        _onevision_video_inputs,
    ),
}


def names() -> tuple[str, ...]:
    return tuple(ZOO)


PADDABLE = (_llava_inputs, _llava_bench_inputs)  # input builders that take left_pad


def paddable_names() -> tuple[str, ...]:
    """Zoo models whose inputs can be a left-padded batch of prompts of different lengths."""
    return tuple(name for name, entry in ZOO.items() if entry.make_inputs in PADDABLE)


def architectures() -> tuple[str, ...]:
    """One entry per supported architecture family (the support matrix's rows)."""
    return tuple(name for name, entry in ZOO.items() if not entry.benchmark)


def build(name: str = "llava", *, seed: int = 0, batch: int = 1, **input_kwargs):
    """Model (eval mode, fp32, seeded init) and one prompt for it."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    entry = ZOO[name]
    torch.manual_seed(seed)
    model = entry.make_model()
    device = next(model.parameters()).device
    inputs = entry.make_inputs(model, batch=batch, seed=seed, **input_kwargs)
    return model, {
        name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()
    }
