"""What the vLLM tier builds on, checked without vLLM: the tiny model folders ``era_compile.vllm.offline``
writes (narrow heads refused, token counts as their models compute them; Qwen2-VL's folder needs
torchvision for its video processor and is checked in the vLLM tier), and
``EagerReference.last["hidden"]``, the kept states the tier's HF-path reference decodes from, and the
slot layout of a request's images as one pool (``pool.plan_pool``)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from era_compile import ERAConfig, zoo
from era_compile.reference import EagerReference, decoder_of
from era_compile.vllm import offline
from era_compile.vllm.pool import pack_positions, plan_pool, pool_capacity, unpack_positions


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


def test_one_image_pool_has_no_dead_slot():
    config = ERAConfig(layer=0, keep_ratio=0.25)
    prompt = [1, 2] + [9] * 64 + [3, 4, 5]
    layout = plan_pool(prompt, [(2, 64)], config)
    assert layout.slots == (16,) and layout.slot_starts == (2,) and layout.kept == 16
    assert layout.served_prompt() == [1, 2] + [9] * 16 + [3, 4, 5]
    assert all(layout.embed_mask())


def test_a_pool_of_images_gives_each_the_most_it_can_keep():
    # T = 64 + 8 = 72, k = 18: the first image may keep up to 18 of its 64, the second all 8 of its 8
    config = ERAConfig(layer=0, keep_ratio=0.25)
    prompt = [1] + [9] * 64 + [2, 3] + [9] * 8 + [4]
    layout = plan_pool(prompt, [(1, 64), (67, 8)], config)
    assert layout.kept == config.kept(72) == 18
    assert layout.slots == (18, 8)
    assert layout.slot_starts == (1, 21)
    assert layout.served_prompt() == [1] + [9] * 18 + [2, 3] + [9] * 8 + [4]
    assert layout.embed_mask() == [True] * 18 + [False, False] + [True] * 8


@pytest.mark.parametrize(
    ("prompt", "spans", "message"),
    [
        ([1] + [9] * 4 + [2], [(1, 4), (3, 2)], "overlap"),
        ([1] + [9] * 4, [(1, 5)], "overlap"),
        ([1, 9, 8, 9, 2], [(1, 3)], "not one repeated placeholder token"),
        ([1, 2], [], "at least one image"),
    ],
)
def test_a_layout_the_prompt_does_not_hold_is_refused(prompt, spans, message):
    with pytest.raises(ValueError, match=message):
        plan_pool(prompt, spans, ERAConfig(layer=0, keep_ratio=0.25))


def test_pool_capacity_bounds_every_layout_of_that_many_images():
    config = ERAConfig(layer=0, keep_ratio=0.25)
    assert pool_capacity(config, 64, 1, 4096) == 16
    assert pool_capacity(config, 64, 2, 4096) == 64  # k = 32: each of the two may keep all of its 32 slots
    assert pool_capacity(config, 64, 8, 4096) == 512  # k = 128 > 64: every image may keep all its tokens
    assert pool_capacity(config, 576, 999, 4096) == 4096  # vLLM's default limit: no more than a prompt
    for counts in [(64, 1), (64, 64), (40, 64), (1, 1), (64, 20)]:
        prompt = [1]
        spans = []
        for count in counts:
            spans.append((len(prompt), count))
            prompt += [9] * count + [2]
        assert sum(plan_pool(prompt, spans, config).slots) <= pool_capacity(config, 64, 2, 4096)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_positions_ride_beside_their_rows_exactly_in_every_model_dtype(dtype):
    positions = torch.tensor([[0, 255, 256], [257, 1001, 4097], [65535, 300, 12345]])
    columns = pack_positions(positions, dtype)
    assert columns.dtype == dtype and columns.shape == (3, 6)
    assert torch.equal(unpack_positions(columns), positions)
    if dtype == torch.bfloat16:  # as one column each, bf16 rounds 257 to 256
        assert not torch.equal(positions.to(dtype).round().long(), positions)
    with pytest.raises(ValueError, match="position 65536"):
        pack_positions(torch.tensor([[65536]]), dtype)
