"""Ragged batches: samples with different numbers of visual tokens (other image sizes, other aspect
ratios, two images next to one, no image next to one), each with its own budget, laid out to the
longest kept sequence; and the compact cache of every layer after prefill and decode."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_cache_rows, build, compiled_forward
from era_compile import ERAConfig, make_era_backend, recompile_headroom, zoo
from era_compile.reference import EagerReference

TOL = 1e-4
GREEDY = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
# case -> (zoo model, its inputs, K). Each case runs at one K, both K across LLaVA's two cases and
# the models: each generates four times (reference, batch, each sample alone), half a minute a run,
# and the suite keeps within 15 minutes.
RAGGED = {
    "qwen2-vl, two image sizes": ("qwen2-vl", dict(batch=2, grid=[(1, 12, 12), (1, 8, 8)]), 0),
    "llava-next, two aspect ratios": ("llava-next", dict(batch=2, image_size=[(40, 60), (60, 40)]), 2),
    "llava, two images next to one": ("llava", dict(batch=2, images=[2, 1]), 2),
    "llava, no image next to one": ("llava", dict(batch=2, images=[1, 0]), 0),
}


def _alone(model, name: str, inputs: dict, b: int) -> dict:
    """Sample b of a left-padded batch as its own prompt: its tokens without the padding, its images."""
    keep = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][keep][None]
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "qwen2-vl":
        patches = inputs["image_grid_thw"].prod(-1).tolist()
        start = sum(patches[:b])
        one.update(
            pixel_values=inputs["pixel_values"][start : start + patches[b]],
            image_grid_thw=inputs["image_grid_thw"][b : b + 1],
            mm_token_type_ids=(ids == zoo.IMAGE_TOKEN_ID).long(),
        )
    elif name == "llava-next":
        one.update(pixel_values=inputs["pixel_values"][b : b + 1], image_sizes=inputs["image_sizes"][b : b + 1])
    else:  # llava: num_visual_tokens(model) placeholder tokens per image
        per_image = zoo.num_visual_tokens(model)
        images = [int((row == zoo.IMAGE_TOKEN_ID).sum()) // per_image for row in inputs["input_ids"]]
        start = sum(images[:b])
        if images[b]:
            one["pixel_values"] = inputs["pixel_values"][start : start + images[b]]
    return one


def _equal(a, b) -> float:
    """The largest difference of two generates' logits, over the steps both made (one with other
    tokens may meet EOS first)."""
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=False))


@pytest.mark.parametrize("case", list(RAGGED))
def test_ragged_batch_matches_the_reference_and_each_sample_alone(case):
    name, kwargs, layer = RAGGED[case]
    model, inputs = build(name, **kwargs)
    config = ERAConfig(layer=layer, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config).generate(**inputs, **GREEDY)
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad(), recompile_headroom():  # three generates' shapes: past Dynamo's default of 8
        batch = model.generate(**inputs, **GREEDY)
        alone = [model.generate(**_alone(model, name, inputs, b), **GREEDY) for b in range(2)]
    assert torch.equal(batch.sequences, expected.sequences)
    assert _equal(batch.logits, expected.logits) <= TOL
    width = inputs["input_ids"].shape[1]
    for b, single in enumerate(alone):  # the same tokens as the sample generated on its own
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, single.sequences.shape[1] - 16 :])
    (site, *_) = backend.report.pruning
    counts = [int(((row == zoo.IMAGE_TOKEN_ID) | (row == zoo.VIDEO_TOKEN_ID)).sum()) for row in inputs["input_ids"]]
    assert [t for t, _ in site.samples] == counts and counts[0] != counts[1]
    assert [k for _, k in site.samples] == [config.kept(t) for t in counts]
    assert backend.report.decode_rewrites > 0


def test_a_blocked_slot_that_received_attention_would_be_seen():
    """The check has teeth: laid out with empty slots that are not blocked (bias 0 instead of
    BLOCKED), the reference itself moves by more than the tolerance; the compiled batch matches the
    blocking one. Both samples unpadded (the one-image sample's padding made text), so the empty
    slots sit in the two-image sample at a position that holds a token and no padding mask hides
    them."""
    import era_compile.algorithms.sequence as sequence

    model, inputs = build("llava", batch=2, images=[2, 1])
    padding = inputs["attention_mask"] == 0
    assert padding[1].any() and not padding[0].any()
    inputs["input_ids"][padding] = 7  # a text token
    inputs["attention_mask"][padding] = 1
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    greedy = dict(GREEDY, max_new_tokens=4)
    expected = EagerReference(model, config).generate(**inputs, **greedy)
    blocked = sequence.BLOCKED
    try:
        sequence.BLOCKED = 0.0
        unblocked = EagerReference(model, config).generate(**inputs, **greedy)
    finally:
        sequence.BLOCKED = blocked
    model.compile(backend=make_era_backend(config))
    with torch.no_grad():
        out = model.generate(**inputs, **greedy)
    assert _equal(out.logits, expected.logits) <= TOL
    assert _equal(unblocked.logits, expected.logits) > 10 * TOL


def test_empty_slots_are_blocked_with_rectify_off():
    """``rectify=False`` drops LAR, not the blocking: the two-image sample (unpadded, so its empty
    slots sit at a position that holds a token) generates as it does alone, where it has no empty
    slot, in prefill and decode; and the reference run the same way agrees."""
    model, inputs = build("llava", batch=2, images=[2, 1])
    padding = inputs["attention_mask"] == 0
    inputs["input_ids"][padding] = 7  # a text token: both samples unpadded, the second keeps more
    inputs["attention_mask"][padding] = 1
    config = ERAConfig(layer=2, keep_ratio=0.25, rectify=False, compiler="eager", strict=True)
    greedy = dict(GREEDY, max_new_tokens=4)
    expected = EagerReference(model, config).generate(**inputs, **greedy)
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad(), recompile_headroom():
        out = model.generate(**inputs, **greedy)
        alone = model.generate(**_alone(model, "llava", inputs, 0), **greedy)
    (site, *_) = backend.report.pruning
    kept = [L - T + k for L, (T, k) in zip(inputs["attention_mask"].sum(-1).tolist(), site.samples, strict=True)]
    assert kept[0] < kept[1] == site.seq_len_after  # sample 0 has empty slots
    assert _equal([x[:1] for x in out.logits], alone.logits) <= TOL
    assert _equal(out.logits, expected.logits) <= TOL


@pytest.mark.parametrize("layer", [1])
def test_left_padded_cache_lengths_after_prefill_and_decode(layer):
    """Layers >= K hold n' rows plus the generated ones, never N; layers < K all N (+ t). The
    generated tokens equal the reference's. K = 0 and 2 are checked on the same batch by
    tests/test_generate.py's left-padded greedy generations (the same compiled model)."""
    model, inputs = build("llava", batch=2, left_pad=(0, 3))
    config = ERAConfig(layer=layer, keep_ratio=0.25, compiler="eager", strict=True)
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    expected = EagerReference(model, config).generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 8  # 7 decode steps
    assert_cache_rows(model, inputs, out, backend.report, layer)


def test_padding_goes_like_a_pruned_token():
    """A text-only prompt beside an image prompt is left-padded by the image's length. The pruned
    length is max_b(L_b - T_b + k_b) with L_b each sample's real length, not the padded
    max_b(N - T_b + k_b) (= N here: the text-only sample kept its padding); every pruned layer
    stores that many rows after prefill and decode, and the tokens are the reference's and each
    sample's alone."""
    model, inputs = build("llava", batch=2, images=[1, 0])
    config = ERAConfig(layer=0, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config).generate(**inputs, **dict(GREEDY, max_new_tokens=6))
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad(), recompile_headroom():
        out = model.generate(**inputs, **dict(GREEDY, max_new_tokens=6))
        alone = model.generate(**_alone(model, "llava", inputs, 1), **dict(GREEDY, max_new_tokens=6))
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(out.sequences[1, -6:], alone.sequences[0, -6:])
    N, (site, *_) = inputs["input_ids"].shape[1], backend.report.pruning
    real = inputs["attention_mask"].sum(-1).tolist()
    counts = [int((row == zoo.IMAGE_TOKEN_ID).sum()) for row in inputs["input_ids"]]
    assert counts[1] == 0 and real[1] == N - counts[0]  # the text-only sample: padded by the image's length
    assert site.seq_len_after == max(L - T + config.kept(T) for L, T in zip(real, counts, strict=True)) < N
    assert site.seq_len_padded == max(N - T + config.kept(T) for T in counts) == N
    assert f"{site.seq_len_after} ({N} had the padding stayed)" in str(backend.report)
    assert_cache_rows(model, inputs, out, backend.report, 0)


def test_keep_all_with_padding_equals_plain_compile_at_every_real_position():
    """keep_ratio=1, LAR and BTR off: only the padding goes (the shorter samples' kept sequences
    begin with empty slots where their padding was), and a padded batch's logits at every real
    position equal plain compile's."""
    model, inputs = build("llava", batch=3, suffix=9, left_pad=(0, 2, 4), seed=6)
    with torch.no_grad():
        plain = torch.compile(model, backend="eager")(**inputs).logits
    torch._dynamo.reset()
    config = ERAConfig(keep_ratio=1.0, layer=1, recycle=False, rectify=False, compiler="eager", strict=True)
    out, report = compiled_forward(model, inputs, config)
    assert report.pruning[0].seq_len_after == report.pruning[0].seq_len_before  # the longest sample has no padding
    real = inputs["attention_mask"].bool()
    assert (out.logits[real] - plain[real]).abs().max().item() <= 1e-5
