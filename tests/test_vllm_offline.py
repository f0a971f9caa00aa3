"""What the vLLM tier builds on, checked without vLLM: the tiny model folders ``era_compile.vllm.offline``
writes (narrow heads refused, token counts as their models compute them; Qwen2-VL's folder needs
torchvision for its video processor and is checked in the vLLM tier), and
``EagerReference.last["hidden"]``, the kept states the tier's HF-path reference decodes from."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from era_compile import ERAConfig, zoo
from era_compile.reference import EagerReference, decoder_of
from era_compile.vllm import offline


@pytest.mark.parametrize("write", [offline.write_llava, offline.write_llava_next, offline.write_qwen2_vl])
def test_heads_narrower_than_vllms_cpu_kernel_are_refused_by_name(write, tmp_path):
    with pytest.raises(ValueError, match=r"hidden // heads = 16: vLLM's CPU attention takes heads of 32 or more"):
        write(tmp_path, hidden=64, heads=4)
    assert not any(tmp_path.iterdir())


def test_llava_next_folder_counts_follow_the_image_and_match_its_model(tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    offline.write_llava_next(tmp_path, layers=1)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    counts = set()
    for size in [(150, 90), (100, 100)]:
        inputs = processor(text="USER: <image>\nHi ASSISTANT:", images=Image.new("RGB", size), return_tensors="pt")
        counts.add(int((inputs["input_ids"] == zoo.IMAGE_TOKEN_ID).sum()))
        with torch.no_grad():
            model(**inputs)  # transformers checks the placeholders against the image features
    assert len(counts) == 2


@torch.no_grad()
def test_reference_records_the_states_the_first_kept_layer_receives():
    model, inputs = zoo.build("llava")
    merged = {}
    layer0 = decoder_of(model).layers[0]

    def record(module, args, kwargs):
        merged.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = layer0.register_forward_pre_hook(record, with_kwargs=True)
    model(**inputs)
    handle.remove()
    unpruned = merged["x"]
    for recycle in (False, True):
        reference = EagerReference(model, ERAConfig(layer=0, keep_ratio=0.25, recycle=recycle, compiler="eager"))
        reference(**inputs)
        last = reference.last
        at_kept = torch.take_along_dim(unpruned, last["keep_index"][..., None], 1)
        assert last["hidden"].shape == at_kept.shape
        visual = reference.visual_positions(inputs["input_ids"])
        text = ~torch.take_along_dim(visual, last["keep_index"], 1)
        assert torch.equal(last["hidden"][text], at_kept[text])  # text rows pass through
        if recycle:  # BTR folds the pruned tokens into the anchors
            assert not torch.allclose(last["hidden"][~text], at_kept[~text])
        else:
            assert torch.equal(last["hidden"], at_kept)
