"""The plugin on Qwen2-VL (M-RoPE): kept image tokens at their original (t, h, w) positions and the
text after them at its original positions, so vLLM generates exactly what era_compile's HF path
(``EagerReference``, which keeps original positions) generates, for images of different grids in one
batch beside a text-only request and a request whose two images are one pool (its dead slots are
invisible, so its tokens must be those of the reference, which has none)."""

from __future__ import annotations

import pytest
import torch
from hf_reference import noise_image
from vllm import SamplingParams

from conftest import start_llm, stop_llm
from era_compile import ERAConfig

ERA = {"keep_ratio": 0.25}
MAX_TOKENS = 8
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
REQUESTS = [
    (f"USER: {IMAGE}What colour is the square? ASSISTANT:", (150, 120)),
    (f"USER: {IMAGE}Describe the picture. ASSISTANT:", (224, 168)),
    ("USER: Say something about the sea. ASSISTANT:", None),
    (f"USER: {IMAGE} and {IMAGE}Which one is brighter? ASSISTANT:", [(150, 120), (120, 180)]),  # one pool
]


def images_of(index: int, size):
    """The request's image, its list of images (one pool), or None."""
    if isinstance(size, list):
        return [noise_image(10 * index + j, s) for j, s in enumerate(size)]
    return noise_image(index, size) if size else None


@pytest.fixture(scope="module")
def outputs(tiny_qwen2_vl):
    # videos are refused with an era section: 0 per prompt, or vLLM's start-up warm-up (which sends one) fails
    llm = start_llm(
        tiny_qwen2_vl, enforce_eager=True, additional_config={"era": ERA}, limit_mm_per_prompt={"image": 2, "video": 0}
    )
    try:
        batch = [
            {"prompt": p, "multi_modal_data": {"image": images_of(i, size)}} if size else {"prompt": p}
            for i, (p, size) in enumerate(REQUESTS)
        ]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
        return llm.generate(batch, params)
    finally:
        stop_llm(llm)


@torch.no_grad()
def hf_path(path, prompt, image, config, dtype=torch.float32):
    """era_compile's HF path at K = 0 (original positions), greedy, EOS not stopping: tokens, log-softmax."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from era_compile.reference import EagerReference

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    inputs = AutoProcessor.from_pretrained(path)(text=prompt, images=image, return_tensors="pt")
    runner = EagerReference(model, config) if image is not None else model
    out = runner.generate(
        **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, torch.stack([logits[0].log_softmax(-1) for logits in out.logits]), inputs["input_ids"].shape[1]


def test_greedy_tokens_equal_the_hf_path_at_original_positions(outputs, tiny_qwen2_vl):
    config = ERAConfig(layer=0, **ERA)
    worst = 0.0
    for i, ((prompt, size), out) in enumerate(zip(REQUESTS, outputs, strict=True)):
        tokens, scores, _ = hf_path(tiny_qwen2_vl, prompt, images_of(i, size), config)
        got = list(out.outputs[0].token_ids)
        assert got == tokens, (prompt, got, tokens)
        for step, token in enumerate(got):
            worst = max(worst, abs(out.outputs[0].logprobs[step][token].logprob - float(scores[step, token])))
    print(f"Qwen2-VL: largest log-probability difference against the HF path: {worst:.2e}")
    assert worst < 1e-3


def test_the_prompt_holds_each_images_slots_only(outputs, tiny_qwen2_vl):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    config = ERAConfig(layer=0, **ERA)
    for i, ((prompt, size), out) in enumerate(zip(REQUESTS, outputs, strict=True)):
        full = processor(text=prompt, images=images_of(i, size), return_tensors="pt")
        ids = full["input_ids"][0]
        counts = [int(grid.prod()) // 4 for grid in full.get("image_grid_thw", [])]  # merge 2 x 2
        assert sum(counts) == int((ids == 250).sum())
        slots = sum(min(T, config.kept(sum(counts))) for T in counts)
        assert len(out.prompt_token_ids) == ids.shape[0] - sum(counts) + slots


def test_bf16_with_positions_past_256_reaches_the_decoder_exactly(tiny_qwen2_vl):
    # Users serve bf16, whose mantissa holds integers exactly only up to 256: with the image past
    # position 300, the positions the decoder receives must be the kept tokens' original ones, as
    # transformers' own get_rope_index lays the unpruned prompt out, and the tokens the HF path's.
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from era_compile.reference import EagerReference

    prompt = "USER: " + "Look at it. " * 27 + f"{IMAGE}What is it? ASSISTANT:"
    image = noise_image(7, (150, 120))
    config = ERAConfig(layer=0, **ERA)
    llm = start_llm(
        tiny_qwen2_vl,
        dtype="bfloat16",
        enforce_eager=True,
        additional_config={"era": ERA},
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    try:
        llm.apply_model(watch_positions)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        (out,) = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], params)
        (seen,) = llm.apply_model(lambda model: model.era_test_positions)
    finally:
        stop_llm(llm)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl, dtype=torch.bfloat16).eval()
    inputs = AutoProcessor.from_pretrained(tiny_qwen2_vl)(text=prompt, images=image, return_tensors="pt")
    original, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs.get("mm_token_type_ids"), inputs["image_grid_thw"], None, inputs["attention_mask"]
    )
    reference = EagerReference(model, config.replace(compiler="eager"))
    with torch.no_grad():
        reference(**inputs)
    keep = reference.last["keep_index"][0]
    prefill = seen[0]
    assert prefill.shape == (3, keep.shape[0]) and int(prefill.max()) > 300
    assert torch.equal(prefill, original[:, 0, keep])
    tokens, _, _ = hf_path(tiny_qwen2_vl, prompt, image, config, dtype=torch.bfloat16)
    assert list(out.outputs[0].token_ids) == tokens


def watch_positions(model):
    """Record the positions each step's first decoder layer receives (after the plugin wrote the kept
    tokens')."""
    model.era_test_positions = []

    def record(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        model.era_test_positions.append(positions.detach().clone())

    model.language_model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
