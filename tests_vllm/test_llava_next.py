"""The plugin on a third vLLM class, LLaVA-NeXT (anyres: an image's token count follows its size):
images of two aspect ratios beside a text-only request, each request's greedy tokens equal to
era_compile's HF path at the plugin's positions (contiguous, as for LLaVA)."""

from __future__ import annotations

from hf_reference import expected_tokens, load, noise_image
from vllm import SamplingParams

from conftest import start_llm, stop_llm
from era_compile import ERAConfig

ERA = {"keep_ratio": 0.25}
MAX_TOKENS = 6
REQUESTS = [
    ("USER: <image>\nWhat colour is the square? ASSISTANT:", (150, 90)),
    ("USER: <image>\nDescribe the picture. ASSISTANT:", (100, 100)),
    ("USER: Say something about the sea. ASSISTANT:", None),
]


def test_greedy_tokens_and_prompt_lengths_equal_the_hf_path(tiny_llava_next):
    llm = start_llm(tiny_llava_next, enforce_eager=True, additional_config={"era": ERA})
    try:
        batch = [
            {"prompt": p, "multi_modal_data": {"image": noise_image(i, size)}} if size else {"prompt": p}
            for i, (p, size) in enumerate(REQUESTS)
        ]
        outputs = llm.generate(batch, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    finally:
        stop_llm(llm)
    hf = load(tiny_llava_next)
    hf[0].generation_config.eos_token_id = None
    config = ERAConfig(layer=0, **ERA)
    counts = set()
    for i, ((prompt, size), out) in enumerate(zip(REQUESTS, outputs, strict=True)):
        image = noise_image(i, size) if size else None
        assert list(out.outputs[0].token_ids) == expected_tokens(hf, prompt, image, config, MAX_TOKENS), prompt
        ids = hf[1](text=prompt, images=image, return_tensors="pt")["input_ids"][0]
        T = int((ids == 250).sum())
        counts.add(T)
        assert len(out.prompt_token_ids) == ids.shape[0] - T + (config.kept(T) if T else 0)
    assert len(counts) == 3, f"the two images were meant to have different token counts: {counts}"
