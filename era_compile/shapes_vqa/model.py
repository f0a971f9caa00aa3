"""The shapes-VQA model: LLaVA's architecture at a size a CPU trains in minutes, and its inputs.

``LlavaForConditionalGeneration`` with a CLIP vision tower (96 px, 8 px patches: 144 visual
tokens, 3 layers of width 96), the two-layer GELU projector, and a Llama of 4 layers, width
128, 4 heads. The prompt is LLaVA's order: the image first, then the question; the model
answers with one word.

The trained weights live beside this file (``weights/``) and load with ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from era_compile.shapes_vqa import task
from era_compile.shapes_vqa.tokenizer import WordTokenizer

WEIGHTS = Path(__file__).parent / "weights"
PATCH = 8
PATCH_GRID = task.IMAGE_SIZE // PATCH  # patches per side
NUM_VISUAL = PATCH_GRID**2
# Every prompt is padded to this length: one shape for every batch, so one compiled graph.
PROMPT_TOKENS = 1 + NUM_VISUAL + task.MAX_QUESTION_WORDS
# CLIP's normalisation constants are for natural images; these centre the task's pixels.
PIXEL_MEAN, PIXEL_STD = 128.0, 64.0


# Weight init std of the language model and projector: HF's 0.02 suits widths near 1000; at width
# 128 it leaves attention uniform for thousands of steps. About 1/sqrt(128) breaks that early.
INIT_STD = 0.06
# Scale of the vision tower's initial sine-cosine position codes: the std of a patch's content
# embedding at init (CLIP's 0.02 x sqrt(3 x 8 x 8 inputs) x pixel scale ~1).
POSITION_SCALE = 0.3


def model_config(tokenizer: WordTokenizer, init_std: float = INIT_STD):
    from era_compile.zoo import llava_config

    return llava_config(
        text=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            tie_word_embeddings=True,
            initializer_range=init_std,
        ),
        vision=dict(
            hidden_size=96,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=task.IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=96,
        ),
        image_token_id=tokenizer.image_id,
        vision_feature_layer=-1,
        initializer_range=init_std,
    )


def build_model(tokenizer: WordTokenizer, seed: int = 0, init_std: float = INIT_STD):
    """A fresh, randomly initialised model (what training starts from).

    The vision tower's learned position embeddings start from 2-D sine-cosine values (as MAE
    initialises ViT) at the scale of the patch embeddings: the questions ask *where*, and
    CLIP's default init (std 0.02, about a fourteenth of a patch's content) leaves a patch's row and
    column nearly invisible to the language model for thousands of steps.
    """
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(model_config(tokenizer, init_std))
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        patches = embeddings.position_embedding.weight[1:]  # row 0 is the class token's
        patches.copy_(_sincos_2d(PATCH_GRID, patches.shape[1]) * POSITION_SCALE)
    return model


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] 2-D sine-cosine position codes, row-major: half the channels code the row,
    half the column, each as sines and cosines of geometrically spaced frequencies."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    codes = [f(axis.reshape(-1, 1) * freqs) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    out = torch.cat(codes, dim=1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


def load_model(path=WEIGHTS):
    """The trained model (eval mode, fp32, SDPA) and its tokenizer."""
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained shapes-VQA model at {path} (train one: python -m era_compile.shapes_vqa.train)"
        )
    model = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    return model, WordTokenizer.load(path / "vocab.json")


def pixel_values(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W], centred."""
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (stacked - PIXEL_MEAN) / PIXEL_STD


def prompt_ids(question: str, tokenizer: WordTokenizer) -> list[int]:
    """``<bos> <image> x 144 question``: LLaVA's order, the image first."""
    return [tokenizer.bos_id] + [tokenizer.image_id] * NUM_VISUAL + tokenizer.encode(question)


def left_padded(rows: Sequence[list[int]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [len(rows), width], each row padded on the left
    (generation's padding side)."""
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batch_inputs(samples: Sequence[task.Sample], tokenizer: WordTokenizer) -> dict[str, torch.Tensor]:
    """Each sample's prompt, left-padded to ``PROMPT_TOKENS``, and its image."""
    inputs = left_padded([prompt_ids(s.question, tokenizer) for s in samples], PROMPT_TOKENS, tokenizer.pad_id)
    inputs["pixel_values"] = pixel_values([s.image for s in samples])
    return inputs


def answer_ids(samples: Sequence[task.Sample], tokenizer: WordTokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.ids[s.answer] for s in samples])


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, as ``generate`` counts them for a left-padded prompt."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def answer_logits(forward: Callable, samples: Sequence[task.Sample], tokenizer: WordTokenizer) -> torch.Tensor:
    """Next-word logits [B, vocab] after each question, from ``forward`` (a model, compiled or not)."""
    inputs = batch_inputs(samples, tokenizer)
    out = forward(**inputs, position_ids=position_ids(inputs["attention_mask"]), logits_to_keep=1)
    return out.logits[:, -1]


@torch.no_grad()
def score(
    forward: Callable, questions: Sequence[task.Sample], tokenizer: WordTokenizer, batch: int = 100
) -> dict[str, float]:
    """Accuracy overall (``"all"``) and per question kind. Every batch holds ``batch`` questions
    (the last is topped up with repeats that are not counted): one input shape, one compiled graph."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    batch = min(batch, len(questions))
    for start in range(0, len(questions), batch):
        chunk = list(questions[start : start + batch])
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        hits = (answer_logits(forward, padded, tokenizer).argmax(-1) == answer_ids(padded, tokenizer))[: len(chunk)]
        for s, hit in zip(chunk, hits.tolist(), strict=True):
            right[s.kind] = right.get(s.kind, 0) + hit
            total[s.kind] = total.get(s.kind, 0) + 1
    scores = {kind: right[kind] / total[kind] for kind in sorted(total)}
    scores["all"] = sum(right.values()) / len(questions)
    return scores
