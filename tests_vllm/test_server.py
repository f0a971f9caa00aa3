"""What a server does, with the plugin on: continuous batching of requests with different images,
image counts (none, one, two as one pool) and the same image under different prompts; chunked
prefill cutting through the kept image tokens; prefix caching; preemption and recomputation. Every
request's greedy tokens must stay the HF path's."""

from __future__ import annotations

import pytest
from hf_reference import expected_tokens, noise_image
from vllm import SamplingParams

from conftest import start_llm, stop_llm
from era_compile import ERAConfig

ERA = {"keep_ratio": 0.25}
MAX_TOKENS = 6
BLOCK = 32


@pytest.fixture(scope="module")
def tight_llm(tiny_llava, monkeypatch_module):
    # KV cache for 128 tokens in blocks of 32 (4 blocks; four ~50-token requests need 8): vLLM must
    # preempt. 16-token steps: the prefill of a kept image is cut into chunks.
    monkeypatch_module.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    engine = start_llm(
        tiny_llava,
        enforce_eager=True,
        additional_config={"era": ERA},
        max_model_len=128,
        block_size=BLOCK,
        kv_cache_memory_bytes=5 * BLOCK * 4096,  # one block is vLLM's null block
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        disable_log_stats=False,
    )
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def stream():
    one, two = noise_image(1), noise_image(2, (224, 160))
    return [
        ("USER: <image>\nWhat colour is the square? ASSISTANT:", one),
        ("USER: <image>\nDescribe it briefly. ASSISTANT:", one),  # same image, another prompt
        ("USER: <image>\nWhat colour is the square? ASSISTANT:", two),
        ("USER: Say something about the sea. ASSISTANT:", None),
        ("USER: <image><image>\nSame? ASSISTANT:", [two, one]),  # one pool: slots for both, some dead
    ]


def run(llm, requests):
    batch = [{"prompt": p, "multi_modal_data": {"image": im}} if im else {"prompt": p} for p, im in requests]
    outputs = llm.generate(batch, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_batching_chunking_and_preemption_keep_the_hf_tokens(tight_llm, hf):
    config = ERAConfig(layer=0, **ERA)
    requests = stream()
    expected = [expected_tokens(hf, p, im, config, MAX_TOKENS) for p, im in requests]
    assert run(tight_llm, requests) == expected
    assert counter(tight_llm, "vllm:num_preemptions") > 0, "the KV cache was meant to be too small for the stream"


def test_prefix_cache_serves_a_repeat_and_never_another_prompts_selection(tight_llm, hf):
    config = ERAConfig(layer=0, **ERA)
    image = noise_image(5)
    # The same image and the same first 32 tokens (the first KV block), then different words: vLLM
    # would share that block if the image's hash did not carry the prompt, though the anchors differ.
    square = ("USER: <image>\nWhat colour is the square on the left? ASSISTANT:", image)
    circle = ("USER: <image>\nWhat colour is the square on the right? ASSISTANT:", image)
    ids = [hf[1](text=p, images=im, return_tensors="pt")["input_ids"][0] for p, im in (square, circle)]
    assert ids[0][:40].tolist() == ids[1][:40].tolist()
    assert run(tight_llm, [square]) == [expected_tokens(hf, *square, config, MAX_TOKENS)]
    before = counter(tight_llm, "vllm:prefix_cache_hits")
    assert run(tight_llm, [square]) == [expected_tokens(hf, *square, config, MAX_TOKENS)]
    repeat = counter(tight_llm, "vllm:prefix_cache_hits")
    assert repeat >= before + BLOCK, "a repeated request should be served its first block from the cache"
    assert run(tight_llm, [circle]) == [expected_tokens(hf, *circle, config, MAX_TOKENS)]
    assert counter(tight_llm, "vllm:prefix_cache_hits") == repeat, "another prompt's selection was served"
