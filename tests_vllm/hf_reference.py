"""The Hugging Face side of the vLLM tier's comparisons, run on the same folder vLLM loads.

``pruned_greedy`` is era_compile's HF path at K = 0 (``EagerReference``: its anchors, recycled states
and ``log b``) with the positions the vLLM plugin uses for a 1-D RoPE model: the served prompt's
tokens numbered 0..n'-1, each image's kept tokens in its slots (``served_layout``). Generation then
runs HF's own decoder and head with LAR written as an additive mask on the kept keys, recomputing
the whole sequence each step (no cache to get wrong).
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


def served_layout(last: dict, ids: torch.Tensor, image_token: int, images: int, config: ERAConfig):
    """The HF path's kept states (``last``: ``EagerReference.last``) laid out as the plugin serves the
    prompt ``ids`` [N] with its ``images`` images (LLaVA's: all of one token count, so adjacent images
    split evenly): each image's kept tokens in order in its ``min(T_i, k)`` slots, then its dead slots
    (zero states, a -inf bias: no weight for any query); the text as kept. Returns the states
    [1, n, D] and the bias [n]."""
    from era_compile.vllm.pool import plan_pool

    is_image = (ids == image_token).int()
    per_image = int(is_image.sum()) // images
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    starts, ends = torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()
    runs = zip(starts, ends, strict=True)
    spans = [(start, per_image) for first, end in runs for start in range(first, end, per_image)]
    layout = plan_pool(ids.tolist(), spans, config)
    keep, hidden = last["keep_index"][0], last["hidden"][0]
    bias = last["log_bias"][0] if config.rectify else torch.zeros_like(last["log_bias"][0])
    states, biases, done = [], [], 0
    for start, count, slots in zip(layout.starts, layout.counts, layout.slots, strict=True):
        upto = (keep >= done) & (keep < start + count)
        dead = slots - int(((keep >= start) & (keep < start + count)).sum())
        states += [hidden[upto], hidden.new_zeros(dead, hidden.shape[1])]
        biases += [bias[upto], bias.new_full((dead,), float("-inf"))]
        done = start + count
    states.append(hidden[keep >= done])
    biases.append(bias[keep >= done])
    return torch.cat(states)[None], torch.cat(biases)


@torch.no_grad()
def pruned_greedy(model, processor, prompt: str, images, config: ERAConfig, max_tokens: int):
    """HF-path pruning at K = 0 of ``prompt`` with ``images`` (one or a list: one pool), then greedy
    decoding at the positions the plugin serves. Returns (tokens, log-softmax per step, served length)."""
    from era_compile.reference import EagerReference

    inputs = processor(text=prompt, images=images, return_tensors="pt")
    reference = EagerReference(model, config.replace(layer=0, compiler="eager"))
    reference(**inputs)
    count = len(images) if isinstance(images, list) else 1
    embeds, bias = served_layout(reference.last, inputs["input_ids"][0], model.config.image_token_index, count, config)
    tokens, scores = greedy_from_embeddings(model, embeds, bias, max_tokens)
    return tokens, scores, embeds.shape[1]


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
