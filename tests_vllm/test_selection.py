"""ERA's selection at K = 0 run through a vLLM model's own modules (``era_compile.vllm.selection``)
picks the anchors, kept positions and biases of the Hugging Face path (``EagerReference``) on the same
weights and prompt, for every strategy the HF path runs at K = 0."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import start_llm, stop_llm
from era_compile import ERAConfig, zoo

PROMPT = "USER: <image>\nWhat colour is the square in the middle? ASSISTANT:"
STRATEGIES = ["era", "entropyprune", "fastv", "divprune", "random"]


@pytest.fixture(scope="module")
def llm(tiny_llava):
    engine = start_llm(tiny_llava, enforce_eager=True)
    yield engine
    stop_llm(engine)


def hf_inputs(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    image = Image.new("RGB", (150, 150), (20, 90, 200))
    image.paste((230, 200, 10), (50, 50, 100, 100))
    inputs = AutoProcessor.from_pretrained(path)(text=PROMPT, images=image, return_tensors="pt")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, inputs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vllm_modules_select_as_the_hf_path(llm, tiny_llava, strategy):
    from era_compile.reference import EagerReference
    from era_compile.vllm.selection import prune_prompt

    config = ERAConfig(layer=0, keep_ratio=0.25, strategy=strategy, compiler="eager")
    model, inputs = hf_inputs(tiny_llava)
    reference = EagerReference(model, config)
    with torch.no_grad():
        reference(**inputs)
    expected = reference.last
    ids = inputs["input_ids"][0]
    visual = ids == zoo.IMAGE_TOKEN_ID

    def prune_in_vllm(vllm_model):
        with torch.no_grad():
            images = vllm_model.embed_multimodal(pixel_values=inputs["pixel_values"])
            merged = vllm_model.embed_input_ids(ids, multimodal_embeddings=images, is_multimodal=visual)
            layer = vllm_model.language_model.model.layers[0]
            return prune_prompt(layer, merged, torch.arange(ids.shape[0]), visual, config)

    (pruned,) = llm.apply_model(prune_in_vllm)
    assert pruned.anchors.tolist() == expected["anchors"][0].tolist()
    assert pruned.keep_index.tolist() == expected["keep_index"][0].tolist()
    bias_error = (pruned.log_bias - expected["log_bias"][0]).abs().max().item()
    assert bias_error <= 1e-4, bias_error
    T = int(visual.sum())
    assert len(pruned.anchors) == config.kept(T) < T
    assert pruned.hidden.shape == (ids.shape[0] - T + config.kept(T), model.config.text_config.hidden_size)
