"""Prompt accounting with vLLM's own numbers: prompt tokens and KV blocks in use per request, pruned
vs unpruned, against the theoretical saving; and keep_ratio=1, which keeps every token, serving
exactly what vLLM serves without the plugin."""

from __future__ import annotations

import math

import pytest
from hf_reference import noise_image
from vllm import SamplingParams

from conftest import start_llm, stop_llm
from era_compile import ERAConfig

PROMPT = "USER: <image>\nWhat colour is the square in the middle? ASSISTANT:"
BLOCK = 32


def blocks_in_use(llm, request) -> tuple[int, int]:
    """(prompt tokens, KV blocks held) of one request right after its prefill, read off vLLM's scheduler."""
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    engine.add_request("accounting", request, SamplingParams(max_tokens=4, temperature=0))
    outputs = []
    while not outputs:
        outputs = [o for o in engine.step() if o.request_id.startswith("accounting")]
        used = free_before - pool.get_num_free_blocks()
        if used:
            break
    while engine.has_unfinished_requests():
        for out in engine.step():
            prompt_tokens = len(out.prompt_token_ids)
    return prompt_tokens, used


def greedy(llm, requests):
    outputs = llm.generate(requests, SamplingParams(max_tokens=8, temperature=0, logprobs=0))
    return [
        (
            list(o.outputs[0].token_ids),
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)],
        )
        for o in outputs
    ]


@pytest.fixture(scope="module")
def measured(tiny_llava):
    request = {"prompt": PROMPT, "multi_modal_data": {"image": noise_image(3)}}
    batch = [
        request,
        {"prompt": "USER: <image>\nDescribe it. ASSISTANT:", "multi_modal_data": {"image": noise_image(4, (200, 120))}},
        {"prompt": "USER: Hello there. ASSISTANT:"},
    ]
    results = {}
    for name, era in [("plain", None), ("era", {"keep_ratio": 0.25}), ("keep all", {"keep_ratio": 1.0})]:
        extra = {} if era is None else {"additional_config": {"era": era}}
        llm = start_llm(tiny_llava, enforce_eager=True, block_size=BLOCK, enable_prefix_caching=False, **extra)
        try:
            results[name] = (blocks_in_use(llm, request), greedy(llm, batch))
        finally:
            stop_llm(llm)
    return results


def test_kv_blocks_and_prompt_tokens_shrink_as_theory_says(measured):
    (plain_tokens, plain_blocks), _ = measured["plain"]
    (era_tokens, era_blocks), _ = measured["era"]
    T = 64
    kept = ERAConfig(layer=0, keep_ratio=0.25).kept(T)
    assert era_tokens == plain_tokens - T + kept
    assert plain_blocks == math.ceil(plain_tokens / BLOCK)
    assert era_blocks == math.ceil(era_tokens / BLOCK)
    print(f"prompt tokens {plain_tokens} -> {era_tokens}; KV blocks {plain_blocks} -> {era_blocks}")


def test_keep_ratio_one_serves_what_vllm_serves(measured):
    (tokens_all, _), keep_all = measured["keep all"]
    (tokens_plain, _), plain = measured["plain"]
    assert tokens_all == tokens_plain
    assert [t for t, _ in keep_all] == [t for t, _ in plain]
    worst = max(
        abs(a - b) for (_, la), (_, lb) in zip(keep_all, plain, strict=True) for a, b in zip(la, lb, strict=True)
    )
    print(f"keep_ratio=1 vs no plugin: largest log-probability difference {worst:.2e}")
    assert worst < 1e-4
