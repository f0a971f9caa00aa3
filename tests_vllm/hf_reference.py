"""The Hugging Face side of the vLLM tier's comparisons, run on the same folder vLLM loads.

``pruned_greedy`` is era_compile's HF path at K = 0 (``EagerReference``: its anchors, recycled states
and ``log b``) with the positions the vLLM plugin uses for a 1-D RoPE model: the kept tokens
numbered 0..n'-1. Generation then runs HF's own decoder and head with LAR written as an additive
mask on the kept keys, recomputing the whole sequence each step (no cache to get wrong).
"""

from __future__ import annotations

import torch
from PIL import Image

from era_compile import ERAConfig


def load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


def noise_image(seed: int, size: tuple[int, int] = (150, 150)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1] // 10 + 1, size[0] // 10 + 1, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy()).resize(size, Image.NEAREST)


@torch.no_grad()
def greedy_from_embeddings(model, embeds: torch.Tensor, log_bias: torch.Tensor, max_tokens: int):
    """Greedy tokens and each step's log-softmax [max_tokens, V] from ``embeds`` [1, n, D] at positions
    0..n-1, with ``log_bias`` [n] added to the logits of those keys in every layer, for every query."""
    decoder, head = model.model.language_model, model.lm_head
    table = model.get_input_embeddings()
    tokens, scores = [], []
    for _ in range(max_tokens):
        n = embeds.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        mask[:, : log_bias.shape[0]] += log_bias
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=mask[None, None], position_ids=torch.arange(n)[None]
        ).last_hidden_state
        logprobs = head(hidden[0, -1]).log_softmax(-1)
        token = int(logprobs.argmax())
        tokens.append(token)
        scores.append(logprobs)
        embeds = torch.cat([embeds, table(torch.tensor([[token]]))], 1)
    return tokens, torch.stack(scores)


@torch.no_grad()
def pruned_greedy(model, processor, prompt: str, image, config: ERAConfig, max_tokens: int):
    """HF-path pruning at K = 0 of ``prompt`` with ``image``, then greedy decoding at contiguous positions.
    Returns (tokens, log-softmax per step, the reference's record)."""
    from era_compile.reference import EagerReference

    inputs = processor(text=prompt, images=image, return_tensors="pt")
    reference = EagerReference(model, config.replace(layer=0, compiler="eager"))
    reference(**inputs)
    last = reference.last
    bias = last["log_bias"][0] if config.rectify else torch.zeros_like(last["log_bias"][0])
    tokens, scores = greedy_from_embeddings(model, last["hidden"], bias, max_tokens)
    return tokens, scores, last


@torch.no_grad()
def expected_tokens(hf, prompt: str, image, config: ERAConfig | None, max_tokens: int) -> list[int]:
    """What the HF path generates greedily: pruned as the plugin does when ``config`` is given and the
    prompt has an image, else HF ``generate()`` as it is."""
    model, processor = hf
    if config is not None and image is not None:
        return pruned_greedy(model, processor, prompt, image, config, max_tokens)[0]
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()
