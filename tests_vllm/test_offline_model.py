"""The tiny LLaVA written offline is a model vLLM serves exactly as Hugging Face runs it: the ground
the plugin's comparisons stand on (greedy tokens equal, fp32, a batch of different images)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import start_llm, stop_llm

PROMPTS = [
    ("USER: <image>\nWhat is in the picture? ASSISTANT:", Image.new("RGB", (160, 120), (200, 30, 60))),
    ("USER: <image>\nDescribe it. ASSISTANT:", Image.linear_gradient("L").convert("RGB").resize((90, 200))),
    ("USER: no image here, just text. ASSISTANT:", None),
]
NEW_TOKENS = 8


def hf_greedy(path, prompt, image):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1] :].tolist()


def test_vllm_serves_the_offline_llava_as_hugging_face_runs_it(tiny_llava):
    from vllm import SamplingParams

    llm = start_llm(tiny_llava)
    try:
        requests = [
            {"prompt": p, "multi_modal_data": {"image": im}} if im is not None else {"prompt": p} for p, im in PROMPTS
        ]
        outs = llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    finally:
        stop_llm(llm)
    for (prompt, image), out in zip(PROMPTS, outs, strict=True):
        prompt_ids, tokens = hf_greedy(tiny_llava, prompt, image)
        assert list(out.prompt_token_ids) == prompt_ids
        assert list(out.outputs[0].token_ids) == tokens
    assert sum(len(out.prompt_token_ids) for out in outs) > 2 * 64  # both images' 64 visual tokens reached the model


def test_heads_narrower_than_vllm_cpu_attention_takes_are_refused(tmp_path):
    from era_compile.vllm.offline import write_llava

    with pytest.raises(ValueError, match="heads of 32 or more"):
        write_llava(tmp_path, hidden=64, heads=4)
