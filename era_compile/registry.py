"""Every image-text-to-text model type of the installed transformers, as a tiny random-init model.

The support matrix is generated from ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: a new
transformers release that adds a model type shows up as a new row. For each type this module
either builds a tiny model and a prompt with one image per sample, or names why it does not
(``Refusal``): the architecture is not the one era_compile prunes (encoder-decoder, cross
attention, images as discrete tokens, an action or diffusion head, ...), or its tower needs
inputs this module cannot build.

Configs are shrunk generically, field by field, from the type's own defaults (the text model to
4 layers x 64 wide, the vision tower to 2 layers x 64), so the model keeps its classes and
graph structure; the vocabulary and special token ids stay the defaults (no id to remap).
Inputs are built by the forward's signature (``image_grid_thw``: flattened patches; ``pixel_attention_mask``:
images per sample; ``image_sizes`` with grid pinpoints: anyres crops; otherwise ``[N, 3, S, S]``; a few
layouts of their own, as their processors make them: ``_PATCH_LAYOUTS``),
and the number of placeholder tokens per image is the model's own: the length of what
``get_image_features`` returns, as a processor computes it.

    model, inputs = registry.build("paligemma")
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, cast

import torch

TEXT_VOCAB = (3, 240)  # prompt text is drawn from here: below every default special token id


@dataclass(frozen=True)
class Refusal(Exception):
    """A model type era_compile does not prune, and why (a sentence a user can act on)."""

    model_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.model_type}: {self.reason}"


def model_types() -> dict[str, str]:
    """model type -> model class name, as the installed transformers registers them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


# --------------------------------------------------------------------------- tiny configs

TEXT = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    # A real model's heads are 64 to 256 wide, and never as wide as its hidden state (cos and sin, [B, N, head_dim],
    # would then look like it): 128, over a hidden state of 64, as Gemma's heads are wider than their share of it.
    head_dim=128,
    max_window_layers=4,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=8192,
    ffn_hidden_size=128,
    d_model=64,
    num_layers=4,
    d_ff=128,
    word_embed_proj_dim=64,
)
VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    depth=2,
    embed_dim=64,
    num_heads=4,
    head_dim=16,
    out_hidden_size=64,
    projection_dim=64,
    vision_output_dim=64,
    num_key_value_heads=4,
    out_features=64,
    text_hidden_size=64,
    deepstack_visual_indexes=[0, 1],
)  # DeepStack: both tower layers feed the decoder
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    depth=2,
    head_dim=16,
    num_key_value_heads=4,
    codebook_dim=64,
    text_hidden_size=64,
)
TOP = dict(
    projector_hidden_size=64,
    projection_dim=64,
    mm_hidden_size=64,
    text_hidden_size=64,
    vision_hidden_size=64,
    mm_tokens_per_image=16,
    num_query_tokens=8,
    image_grid_pinpoints=[[64, 128], [128, 64], [128, 128]],
)

# What the generic shrink cannot infer, per model type: {sub-config name or "": {field: value}}.
# These are builders' facts (a tower's layer indices, a projector's table), never read by a pass.
# SAM, then a second encoder over SAM's feature map (the DeepSeek-OCR family): a 64-pixel view, 8 x 8
# patches that SAM's two stride-2 convolutions bring to 2 x 2, whose last width must be the second
# encoder's; one global layer of SAM's 2 (their mlp_dim is stored, not derived); SAM's default init std
# (1e-10, a checkpoint's placeholder) would leave a random tower blind to its pixels, every view's tokens alike.
_TINY_SAM = {
    "image_size": 64,
    "patch_size": 8,
    "output_channels": 32,
    "mlp_dim": 128,
    "downsample_channels": [32, 64],
    "window_size": 4,
    "global_attn_indexes": [1],
    "initializer_range": 0.02,
}

# A hybrid decoder's first attention layer is its fourth: 8 layers keep one after the cut there, and a linear one
# between them (Qwen3.5: linear, linear, linear, full, ...). MiniCPM-V's merger windows run after tower layer 0,
# and its image token id is the tokenizer's, not the config's.
_HYBRID = {"num_hidden_layers": 8}

OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    # LFM2's default config attends in every layer; its checkpoints (LFM2-VL-1.6B: attention at 2, 5, 8, 10,
    # 12, 14 of 16, short convolutions elsewhere) are hybrid: their first 8 layers
    "lfm2_vl": {
        "text_config": {
            "num_hidden_layers": 8,
            "full_attn_idxs": [2, 5],
            "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv"],
        }
    },
    "qwen3_5": {"text_config": _HYBRID},
    "qwen3_5_moe": {"text_config": _HYBRID},
    "minicpm_ocr": {"": {"insert_layer_id": 0, "image_token_id": 1000}, "text_config": _HYBRID},
    "minicpmv4_6": {"": {"insert_layer_id": 0, "image_token_id": 1000}, "text_config": _HYBRID},
    "minicpmv4_7": {"": {"insert_layer_id": 0, "image_token_id": 1000}, "text_config": _HYBRID},
    "vipllava": {"": {"vision_feature_layers": [-2, -1]}},
    "aria": {"": {"projector_patch_to_query_dict": {64: 16}}},
    "blip-2": {"": {"image_token_index": 50265}},  # as the processors of current checkpoints expand it
    "instructblip": {"": {"image_token_index": 50265}},
    "glm5_next": {"text_config": {"num_key_value_heads": 4, "qk_rope_head_dim": 0}},  # MLA without RoPE (DSA)
    # its forward reads a sliding window though every layer attends in full (transformers 5.24)
    "step3p7": {"text_config": {"sliding_window": 4096}},
    "llama4": {"vision_config": {"intermediate_size": 256, "projector_input_dim": 64, "projector_output_dim": 64}},
    "molmo2": {
        "adapter_config": {"vision_feature_layer": [-1, -2]},
        "vision_config": {"num_position_embeddings": 64},
    },  # one position per patch of a crop
    "hy_v4_vl": {
        "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}
    },
    # its default config names no RoPE per layer type, which the rotary embedding looks up
    "cohere_compass": {
        "text_config": {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 24, 24]}
            }
        }
    },
    # Ernie interleaves the h and w sections pairwise: they must be equal
    "ernie4_5_vl_moe": {
        "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]}}
    },
    # M-RoPE whose default sections live in the modeling code, not the config
    "paddleocr_vl": {
        "text_config": {
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [16, 24, 24]}
        }
    },
    # the checkpoints' thinker configs carry it; M-RoPE finds each image by it
    "qwen2_5_omni_thinker": {"": {"vision_start_token_id": 151652}},
    "qwen3_omni_moe_thinker": {"": {"vision_start_token_id": 151652}},
    "mistral_large4": {"text_config": {"num_key_value_heads": 4}},  # MLA: a key per query head
    "hunyuan_vl": {"text_config": {"head_dim": 128}},  # None in its default, derived from widths not shrunk
    "kimi_k25": {
        "": {"projection_hidden_size": 64},  # the tower's width, as the projector reads it
        # MLA: a key per query head; head_dim = qk_rope_head_dim, the rotary width DeepSeek-V3 derives
        "text_config": {"num_key_value_heads": 4, "head_dim": 8},
    },
    "nemotron_h_omni": {"": {"image_token_id": 1000}},  # the tokenizer's, not the config's
    # the adapter reads the tower's 2 x 2 pixel-shuffled width and writes the text width
    "muse_glimmer": {"": {"out_hidden_size": 256, "projector_hidden_size": 64}},
    # an audio pyramid: one patch size, width and depth per level, as many as its layers
    "muse_spark": {
        "": {"out_hidden_size": 256, "projector_hidden_size": 64},
        "audio_config": {"patch_sizes": [16, 6], "hidden_sizes": [32, 64], "depths": [1, 1], "out_hidden_size": 64},
    },
    "inkling_mm_model": {"vision_config": {"n_layers": 4}},  # its tower's layer count, by another name
    # its default leaves out the sparse-attention indexer its attention layers build
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 128,
            "indexer_budget": 16,
            "indexer_compress_ratio": 4,
        }
    },
    "deepseek_vl_hybrid": {"high_res_vision_config": {"global_attn_indexes": [1]}},  # of its 2 layers
    # MLA: a key per query head; its sliding-window layers (2 and 3 of 4) have attention sizes of their own
    "dots3_note": {
        "text_config": {
            "num_key_value_heads": 4,
            "per_layer_config": {
                layer: dict(
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    q_lora_rank=32,
                    kv_lora_rank=16,
                    head_dim=16,
                    qk_nope_head_dim=8,
                    qk_rope_head_dim=8,
                    v_head_dim=16,
                )
                for layer in (2, 3)
            },
        },
        # the towers' adapters: from their own width to the text width
        "vision_config": {"adapter_in_dim": 64, "adapter_out_dim": 64},
        "audio_config": {"adapter_input_size": 64, "adapter_out_dim": 64},
    },
    # its defaults leave out the tower layers it injects into which decoder layers (DeepStack)
    "granite4_vision": {
        "": {"downsample_rate": "1/2", "deepstack_layer_map": [[-2, 1], [-1, 2]], "spatial_target_layers": [0, 1, 2, 3]}
    },
    "fuyu": {"": {"patch_size": 8, "image_size": 64}},  # its patches are the text model's inputs: no tower
    "gemma4_unified": {"vision_config": {"mm_embed_dim": 64, "output_proj_dims": 64}},  # no tower: a projection
    # DeepSeek-OCR-2's second encoder appends its 144 learned queries (the 768-pixel set, which any view this
    # small selects); its decoder's default lists no dense/sparse MLP layers and routes to no number of
    # experts (None, which the generic shrink leaves alone).
    "deepseek_ocr2": {
        "sam_config": _TINY_SAM,
        "text_config": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "num_experts_per_tok": 2},
    },
    # Unlimited-OCR's second encoder (CLIP) takes SAM's 2 x 2 map as its patches: a position per cell
    "unlimited_ocr": {"sam_config": _TINY_SAM, "encoder_config": {"image_size": 16, "patch_size": 8}},
}


def _role(name: str) -> dict[str, Any] | None:
    if "text" in name or name in ("decoder", "vlm_config"):
        return TEXT
    if "vision" in name or "vq" in name:
        return VISION
    if name.endswith("_config"):
        return SMALL
    return None


def _shrunk(config, sizes: dict[str, Any], overrides: dict[str, dict[str, Any]], name: str = ""):
    """``config`` rebuilt with the fields of ``sizes`` it has (its derived fields recomputed)."""
    fields = config.to_dict()
    layers = fields.get("num_hidden_layers")
    for key, value in sizes.items():
        if key not in fields:
            continue
        old = fields[key]
        if isinstance(old, int) and not isinstance(old, bool) or not isinstance(value, int):
            fields[key] = value
        elif isinstance(old, list) and isinstance(layers, int) and len(old) == layers and isinstance(value, int):
            fields[key] = [value] * sizes.get("num_hidden_layers", layers)  # one per layer
    for key, old in list(fields.items()):  # per-layer lists the config derives from the layer count
        if isinstance(old, list) and isinstance(layers, int) and layers > 2 and len(old) == layers and key not in sizes:
            if key == "layer_types" and "num_hidden_layers" in sizes:
                depth = overrides.get(name, {}).get("num_hidden_layers", sizes["num_hidden_layers"])
                fields[key] = tiny_layer_types(old, depth)
            else:
                fields.pop(key)
    per_layer = fields.get("per_layer_config")
    if isinstance(per_layer, dict) and isinstance(fields.get("num_hidden_layers"), int):  # layers that still exist
        fields["per_layer_config"] = {i: c for i, c in per_layer.items() if int(i) < fields["num_hidden_layers"]}
    rope = fields.get("rope_parameters")
    mrope = "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ())
    if isinstance(rope, dict) and "rope_type" in rope and ("mrope_section" in rope or mrope):
        partial = fields.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        head = overrides.get(name, {}).get("head_dim", fields.get("head_dim"))  # else derived from the widths
        head = head if isinstance(head, int) else fields["hidden_size"] // fields["num_attention_heads"]
        half = int(head * partial) // 2  # M-RoPE's (t, h, w) split of the rotary half
        fields["rope_parameters"] = dict(
            rope, mrope_section=[2, 3, 3] if half == 8 else [half - 2 * (half // 3), half // 3, half // 3]
        )
    _shrink_vision_grid(fields, sizes is VISION)
    fields.update(overrides.get(name, {}))
    for sub_name in list(fields):
        sub = getattr(config, sub_name, None) if isinstance(fields[sub_name], dict) else None
        role = _role(sub_name)
        if role is not None and hasattr(sub, "to_dict"):
            fields[sub_name] = _shrunk(sub, role, overrides, sub_name)
    for read_only in ("transformers_version", "model_type"):
        fields.pop(read_only, None)
    return type(config)(**fields)


def tiny_layer_types(kinds: list[str], layers: int) -> list[str]:
    """A real model's layer types on ``layers`` layers: its first ones, then the first layer of each
    kind they leave out, in the real order (Gemma 3's five sliding layers, then a full one: sliding,
    sliding, sliding, full). Every kind keeps a layer, and the first layers keep their kinds."""
    head = list(kinds[:layers])
    missing = [kind for kind in dict.fromkeys(kinds) if kind not in head]
    return head[: layers - len(missing)] + missing


def first_attention_layer(model, at_least: int) -> int:
    """The first decoder layer from ``at_least`` on that holds softmax attention: where a hybrid decoder
    (linear, recurrent or convolution layers between attention layers) can be cut."""
    from era_compile.reference import attends, decoder_of

    layers = list(cast(torch.nn.ModuleList, decoder_of(model).layers))
    return next((i for i in range(at_least, len(layers)) if attends(layers[i])), at_least)


def hybrid_layers(model) -> list[int]:
    """The decoder layers without softmax attention (a hybrid decoder's linear, recurrent or convolution
    layers, or blocks of an MLP alone); none in a decoder of attention layers."""
    from era_compile.reference import attends, decoder_of

    return [i for i, layer in enumerate(cast(torch.nn.ModuleList, decoder_of(model).layers)) if not attends(layer)]


def sliding_window(config) -> int | None:
    """The text model's sliding window W when some of its layers use one, else None (a window beside
    layer types that are all full is unused)."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if not isinstance(window, int):
        return None
    if layer_types:
        return window if any("sliding" in kind for kind in layer_types) else None
    return window if getattr(text, "use_sliding_window", True) is not False else None


def _shrink_vision_grid(fields: dict, vision: bool) -> None:
    """A small image: 8 x 8 patches of 8 pixels (Qwen-style towers: patches of 4)."""
    if not vision:
        return
    if "spatial_merge_size" in fields and "temporal_patch_size" in fields:
        fields["patch_size"] = 4
        return
    patch = fields.get("patch_size")
    if isinstance(patch, int):
        fields["patch_size"] = 8
    elif isinstance(patch, (list, tuple)):
        fields["patch_size"] = [8, 8]
    image = fields.get("image_size")
    if isinstance(image, int):
        fields["image_size"] = 64
    elif isinstance(image, (list, tuple)):
        fields["image_size"] = [64, 64]
    if "num_patches" in fields:
        fields["num_patches"] = 64


def special_token_ids(config) -> list[int]:
    """The config's own token ids (image, video, boundaries...): the vocabulary must hold them."""
    return [
        v
        for k, v in config.to_dict().items()
        if isinstance(v, int) and not isinstance(v, bool) and (k.endswith("_token_id") or k.endswith("_token_index"))
    ]


def tiny_config(model_type: str, *, window: int | None = None):
    """``model_type``'s default config, shrunk; ``window``: its sliding window set to this instead
    of the real one (a prompt that fills it)."""
    from transformers import CONFIG_MAPPING

    default = CONFIG_MAPPING[model_type]()
    if getattr(default, "vision_config", False) is None:  # an optional tower its default leaves out
        default = CONFIG_MAPPING[model_type](vision_config={})
    overrides = {k: dict(v) for k, v in OVERRIDES.get(model_type, {}).items()}
    text = getattr(default, "text_config", None)
    ids = special_token_ids(default) + [v for k, v in overrides.get("", {}).items() if k.endswith("_token_index")]
    if text is not None and ids and max(ids) >= getattr(text, "vocab_size", 0):
        overrides.setdefault("text_config", {}).setdefault("vocab_size", max(ids) + 1)
    if window is not None:
        overrides.setdefault("text_config" if text is not None else "", {})["sliding_window"] = window
    top = TOP if any(k.endswith("text_config") for k in default.to_dict()) else dict(TEXT, **TOP)
    config = _shrunk(default, top, overrides)
    config._attn_implementation = "sdpa"
    return config


# --------------------------------------------------------------------------- prompts


def image_token_id(config) -> int:
    for holder in (config, getattr(config, "text_config", None)):
        for name in ("image_token_id", "image_token_index"):
            value = getattr(holder, name, None)
            if isinstance(value, int):
                return value
    raise Refusal(config.model_type, "its config names no image token id (image_token_id / image_token_index)")


def _forward_args(model) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def _packed_patches(vision, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """MiniCPM-V's NaViT packing: every image's patches side by side in one [1, C, P, n * P] strip,
    their grids (in patches) in ``target_sizes``."""
    side = 16  # the tower's 2 x 2 windows, then the merger's 2 x 2: 16 tokens an image
    patch = vision.patch_size
    return {
        "pixel_values": torch.randn(1, vision.num_channels, patch, batch * side * side * patch, generator=g),
        "target_sizes": torch.tensor([[side, side]] * batch, dtype=torch.int32),
    }


def _pooled_crops(vision, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Molmo2: each image a low-res crop and one high-res crop of flattened patches; each token pools a
    2 x 2 window of patches (``image_token_pooling`` indexes them), ``image_grids`` its token grids."""
    side = vision.image_size[0] // vision.patch_size
    patch_dim = vision.num_channels * vision.patch_size**2
    crops = 2 * batch
    windows = torch.arange(side * side).reshape(side // 2, 2, side // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    return {
        "pixel_values": torch.randn(crops, side * side, patch_dim, generator=g),
        "image_token_pooling": torch.cat([windows + crop * side * side for crop in range(crops)]),
        "image_grids": torch.tensor([[side // 2] * 4] * batch),
        "image_num_crops": torch.tensor([2] * batch),
    }


def _positioned_patches(vision, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Gemma 4: flattened patches with their (x, y) positions, a grid the pooling kernel divides
    (16 tokens an image); a processor that merges them first hands one patch a token."""
    merged = getattr(vision, "model_patch_size", None)
    patch, side = (merged, 4) if merged else (vision.patch_size, 4 * vision.pooling_kernel_size)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([x, y], dim=-1).reshape(side * side, 2)
    return {
        "pixel_values": torch.rand(batch, side * side, 3 * patch**2, generator=g),
        "image_position_ids": positions.expand(batch, -1, -1).clone(),
    }


def _patch_clips(vision, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Inkling: an image cut into P x P tiles, each repeated over the temporal patch as a clip
    [T, P, P, C]; the tower folds each clip into one token (16 an image here)."""
    tiles = 16 * batch
    return {
        "pixel_values": torch.randn(
            tiles, vision.temporal_patch_size, vision.patch_size, vision.patch_size, vision.num_channels, generator=g
        )
    }


def _tiled_views(vision, batch: int, g: torch.Generator, *, grid: bool = False) -> dict[str, Any]:
    """DeepSeek-OCR's processors: each image a global view and, cropped from it, local tiles (here a row of
    2), each tile a view of its own through the SAM tower, all tiles of the batch in one ``pixel_values_local``;
    ``num_local_patches`` counts each image's tiles (a tensor, as DeepSeek-OCR-2's processor hands it).
    ``grid``: Unlimited-OCR's, which also hands each image's tile grid (columns, rows) in ``patches_grid``,
    both as lists (its processor skips their tensor conversion)."""
    size = vision.sam_config.image_size
    columns, rows = 2, 1
    out = {
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "pixel_values_local": torch.randn(batch * columns * rows, 3, size, size, generator=g),
    }
    if grid:
        return dict(out, num_local_patches=[columns * rows] * batch, patches_grid=[[columns, rows]] * batch)
    return dict(out, num_local_patches=torch.tensor([columns * rows] * batch))


def _tiled_grid_views(vision, batch: int, g: torch.Generator) -> dict[str, Any]:
    return _tiled_views(vision, batch, g, grid=True)


# A forward argument that names a patch layout of its own -> the builder of that layout (the first that
# matches: ``patches_grid`` before the ``pixel_values_local`` it comes with).
_PATCH_LAYOUTS = (
    ("target_sizes", _packed_patches),
    ("image_token_pooling", _pooled_crops),
    ("image_position_ids", _positioned_patches),
    ("patches_grid", _tiled_grid_views),
    ("pixel_values_local", _tiled_views),
)
# Tiled views through a SAM tower, where the vision config has one (Step3p7 names ``pixel_values_local``
# too, for crops of a tower of its own)
_SAM_LAYOUTS = (_tiled_grid_views, _tiled_views)
# Types whose layout nothing in their signature names.
_TYPE_LAYOUTS = {"inkling_mm_model": _patch_clips}


# Types whose processor hands a grid's patches as [N, C, P, P] images, a convolution's input, where the
# others flatten them to rows: nothing in the config or the signature tells the two apart.
UNFLATTENED_PATCHES = frozenset({"paddleocr_vl", "kimi_k25"})


def _vision_inputs(model, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One image per sample, in the form the forward's signature asks for."""
    config = model.config
    args = _forward_args(model)
    if "image_patches" in args:  # Fuyu: the decoder embeds raw patches, the config holds their size
        patch_dim = config.num_channels * config.patch_size**2
        side = config.image_size // config.patch_size
        return {"pixel_values": torch.randn(batch, side * side, patch_dim, generator=g)}
    vision = config.vision_config
    if config.model_type in _TYPE_LAYOUTS:
        return _TYPE_LAYOUTS[config.model_type](vision, batch, g)
    for needs, builder in _PATCH_LAYOUTS:
        if needs in args and (builder not in _SAM_LAYOUTS or hasattr(vision, "sam_config")):
            return builder(vision, batch, g)
    grid = next((name for name in ("image_grid_thw", "image_grid_hw") if name in args), None)
    if grid is not None:  # flattened patches of all images, and each image's grid in patches
        merge = getattr(vision, "spatial_merge_size", getattr(vision, "merge_size", 2))
        side = 4 * merge
        channels = getattr(vision, "in_channels", getattr(vision, "num_channels", 3))
        frames = getattr(vision, "temporal_patch_size", getattr(vision, "patch_temporal", 1))
        patch_dim = channels * frames * vision.patch_size**2
        patches = torch.randn(batch * side * side, patch_dim, generator=g)
        if config.model_type in UNFLATTENED_PATCHES:
            patches = patches.reshape(batch * side * side, channels, vision.patch_size, vision.patch_size)
        time = [1] if grid == "image_grid_thw" else []
        out = {"pixel_values": patches, grid: torch.tensor([time + [side, side]] * batch)}
        if "image_merge_sizes" in args:
            out["image_merge_sizes"] = torch.tensor([merge] * batch)
        return out
    if getattr(vision, "image_size", None) is None and isinstance(getattr(vision, "num_patches", None), int):
        side = int(vision.num_patches**0.5)  # NaFlex (SigLIP2): flattened patches, their grid and mask
        patch_dim = getattr(vision, "num_channels", 3) * vision.patch_size**2
        return {
            "pixel_values": torch.randn(batch, side * side, patch_dim, generator=g),
            "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * batch),
        }
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    if "pixel_attention_mask" in args:
        tiled = "tile_fine_mask" in args  # the mask marks real tiles, not pixels (Granite Docling)
        return {
            "pixel_values": torch.randn(batch, 1, 3, size, size, generator=g),
            "pixel_attention_mask": torch.ones((batch, 1) if tiled else (batch, 1, size, size), dtype=torch.bool),
        }
    if "image_sizes" in args and getattr(config, "image_grid_pinpoints", None):
        return {
            "pixel_values": torch.randn(batch, 5, 3, size, size, generator=g),
            "image_sizes": torch.tensor([[size, size * 2]] * batch),
        }
    out = {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    if "image_sizes" in args and "pixtral" in getattr(vision, "model_type", ""):
        out["image_sizes"] = torch.tensor([[size, size]] * batch)  # a tower that reads them
    high_res = getattr(config, "high_res_vision_config", None)
    if "high_res_pixel_values" in args and high_res is not None:
        out["high_res_pixel_values"] = torch.randn(batch, 3, high_res.image_size, high_res.image_size, generator=g)
    return out


def visual_tokens_per_image(model, vision_inputs: dict[str, torch.Tensor], batch: int) -> int:
    """How many placeholder tokens one image takes: the features the model itself computes."""
    query_tokens = getattr(model.config, "num_query_tokens", None)
    if isinstance(query_tokens, int):
        return query_tokens  # a Q-Former's queries stand for the image, whatever its size
    get = getattr(model, "model", model).get_image_features
    parameters = inspect.signature(get).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    extra = {k: v for k, v in vision_inputs.items() if takes_any or k in parameters}
    with torch.no_grad():
        out = get(**extra)
    features = getattr(out, "pooler_output", out)
    if features is None and getattr(out, "deepstack_features", None):  # (decoder layer, features): DeepStack only
        features = out.deepstack_features[0][1]
    if features is None:
        features = out.last_hidden_state
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    hidden = model.config.get_text_config().hidden_size
    total = features.numel() // hidden
    if total % batch:
        raise ValueError(f"{total} visual tokens for {batch} images")
    return total // batch


def make_inputs(model, *, batch: int = 1, prefix: int = 5, suffix: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    config = model.config
    g = torch.Generator().manual_seed(seed)
    image = image_token_id(config)  # first: a type that names none is refused before its inputs are built
    vision = _vision_inputs(model, batch, g)
    count = visual_tokens_per_image(model, vision, batch)
    start, end = (getattr(config, name, None) for name in ("vision_start_token_id", "vision_end_token_id"))
    rows = []
    for _ in range(batch):
        parts = [torch.randint(*TEXT_VOCAB, (prefix,), generator=g)]
        parts += [torch.tensor([start])] if isinstance(start, int) else []
        parts.append(torch.full((count,), image))
        parts += [torch.tensor([end])] if isinstance(end, int) else []
        parts.append(torch.randint(*TEXT_VOCAB, (suffix,), generator=g))
        rows.append(torch.cat(parts))
    input_ids = torch.stack(rows)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **vision}
    args = _forward_args(model)
    if "qformer_input_ids" in args:  # InstructBLIP's instruction, read by its Q-Former
        inputs["qformer_input_ids"] = torch.randint(*TEXT_VOCAB, (batch, 4), generator=g)
        inputs["qformer_attention_mask"] = torch.ones(batch, 4, dtype=torch.long)
    for name in ("token_type_ids", "mm_token_type_ids"):
        if name in args:
            inputs[name] = (input_ids == image).long()
    return inputs


def structural_refusal(model_type: str, config, model_class: type) -> Refusal | None:
    """A type whose architecture is not the one era_compile prunes, read off its config and class."""
    from transformers import GenerationMixin

    fields = config.to_dict()
    if getattr(config, "is_encoder_decoder", False):
        return Refusal(
            model_type,
            "encoder-decoder: the image feeds an encoder; era_compile prunes the visual "
            "tokens of a decoder-only sequence",
        )
    if not issubclass(model_class, GenerationMixin):
        return Refusal(
            model_type,
            f"not a token-by-token text generator ({model_class.__name__} has no generate(): "
            "an action or diffusion head decodes); era_compile prunes the prompt of an "
            "autoregressive decoder",
        )
    # the text model's own cross-attention layers, when it has some (not a Q-Former's, nor a False flag)
    text_fields = [k for k, v in config.get_text_config().to_dict().items() if v]
    if any("cross_attention" in k or "cross_layer" in k for k in list(fields) + text_fields):
        return Refusal(
            model_type,
            "cross-attention: the encoder's features enter through cross-attention layers, "
            "not as tokens of the sequence",
        )
    vision = fields.get("vision_config")
    if (
        "vq_config" in fields
        and "vision_config" not in fields
        or isinstance(vision, dict)
        and "codebook_size" in vision
    ):
        return Refusal(
            model_type, "images enter as discrete VQ codes (token ids): no visual features are merged into the sequence"
        )
    if (
        not any(k.endswith("vision_config") or k == "vlm_config" for k in fields)
        and "image_token_id" not in fields
        and "image_token_index" not in fields
    ):
        return Refusal(model_type, "no vision tower in its config: nothing visual to prune")
    return None


# What transformers raises when a model cannot be built the way era_compile needs it.
_UNBUILDABLE = (
    (
        "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention",
        "transformers has no SDPA attention for it: the passes rewrite scaled_dot_product_attention calls",
    ),
    (
        "requires the timm library",
        "its vision tower needs timm, and timm torchvision: a missing install, not its structure. PyPI's "
        "torchvision for torch 2.13 (0.28.0) is built against CUDA torch and fails to load beside the CPU "
        "build ('operator torchvision::nms does not exist'), and no CPU build is reachable here",
    ),
)


def _towers_eager(config) -> bool:
    """Every sub-config but the text model's set to eager attention (a tower transformers wrote no SDPA
    for); False when there is none to set."""
    text = config.get_text_config()
    towers = [
        sub
        for name, sub in vars(config).items()
        if name.endswith("_config") and hasattr(sub, "_attn_implementation") and sub is not text
    ]
    for sub in towers:
        sub._attn_implementation = "eager"
    return bool(towers)


def build(
    model_type: str, *, seed: int = 0, batch: int = 1, window: int | None = None, **input_kwargs
) -> tuple[torch.nn.Module, dict]:
    """A tiny ``model_type`` model (eval, fp32, seeded) and a prompt with one image per sample;
    raises ``Refusal`` for a type era_compile does not prune. ``window``: a sliding window of this
    many tokens instead of the real one."""
    import transformers

    types = model_types()
    if model_type not in types:
        raise ValueError(f"unknown image-text-to-text model type {model_type!r}")
    from transformers import CONFIG_MAPPING

    model_class = getattr(transformers, types[model_type])
    refusal = structural_refusal(model_type, CONFIG_MAPPING[model_type](), model_class)
    if refusal is not None:
        raise refusal
    config = tiny_config(model_type, window=window)
    torch.manual_seed(seed)
    try:
        try:
            model = model_class(config).eval()
        except ValueError as e:  # a tower without SDPA: only the decoder's attention is rewritten
            if _UNBUILDABLE[0][0] not in str(e) or not _towers_eager(config):
                raise
            torch.manual_seed(seed)
            model = model_class(config).eval()
    except (ValueError, ImportError) as e:
        reason = next((why for text, why in _UNBUILDABLE if text in str(e)), None)
        if reason is None:
            raise
        raise Refusal(model_type, reason) from e
    return model, make_inputs(model, batch=batch, seed=seed, **input_kwargs)
