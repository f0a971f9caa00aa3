"""Sliding windows as users have them: longer than the prompt, and run past in decode.

Gemma 3's tiny model keeps the real config's window (4096 tokens) and its layer pattern (sliding
layers, then a full one): a prompt of a few dozen tokens does not fill the window. The registry
matrix checks one prompt of each windowed type against the reference and, with a window its prompt
fills, against the oracle (``tests/test_registry.py``); here a left-padded batch of two prompts of
other lengths, compiled with ``dynamic=True``, and decode that runs past a filled window for both.
"""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import compiled_generate, generate_matches_reference, greedy, logits_difference
from era_compile import ERAConfig, registry
from era_compile.algorithms import kept_count
from era_compile.reference import EagerReference
from oracle import FIXED

TOL = 1e-4


def _left_padded(model, prefixes: tuple[int, ...], seed: int = 3) -> dict:
    """One prompt per prefix length (the same image size), the shorter ones left-padded to the longest."""
    prompts = [registry.make_inputs(model, prefix=p, seed=seed + i) for i, p in enumerate(prefixes)]
    width = max(p["input_ids"].shape[1] for p in prompts)
    batch: dict = {}
    for name in prompts[0]:
        parts = [p[name] for p in prompts]
        if name in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
            parts = [torch.cat([x.new_zeros(1, width - x.shape[1]), x], 1) for x in parts]
        batch[name] = torch.cat(parts)
    return batch


def test_a_window_longer_than_the_prompt_prunes_a_ragged_batch_under_dynamic_shapes():
    model, _ = registry.build("gemma3")
    assert registry.sliding_window(model.config) == 4096  # the real one
    inputs = _left_padded(model, prefixes=(5, 11))
    assert inputs["input_ids"].shape[1] < 64 and int(inputs["attention_mask"][0].sum()) < inputs["input_ids"].shape[1]
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    report = generate_matches_reference(model, inputs, config, max_new_tokens=6, dynamic=True).report
    assert report.pruned and report.decode_rewrites > 0


def test_decode_past_a_filled_window_equals_the_oracle_in_every_step_of_a_ragged_batch():
    """K = 0 with fixed anchors, nothing recycled or rectified: every kept token attends, at its
    original position, to the kept keys less than W positions back, in the prompt and in each of 10
    decode steps (the prompts are 28 and 34 tokens, the window 12)."""
    model, _ = registry.build("gemma3", window=12)
    inputs = _left_padded(model, prefixes=(5, 11))
    visual = inputs["input_ids"] == registry.image_token_id(model.config)
    k = kept_count(int(visual[0].sum()), keep_ratio=0.25)
    config = ERAConfig(
        layer=0, keep_ratio=0.25, strategy=FIXED, recycle=False, rectify=False, compiler="eager", strict=True
    )
    generated, backend = compiled_generate(model, inputs, config, greedy(10))
    expected = oracle.generate(model, inputs, visual, k, **greedy(10))
    assert torch.equal(generated.sequences, expected.sequences)
    assert logits_difference(generated, expected) <= TOL
    assert backend.report.pruned and backend.report.decode_rewrites > 0
    # the check has teeth: the oracle with every token kept gives other logits
    unpruned = oracle.generate(model, inputs, visual, int(visual[0].sum()), **greedy(10))
    assert logits_difference(unpruned, expected) > 1e-3


@pytest.mark.parametrize("window", [12, 4096])
def test_the_reference_windows_its_decode_by_original_positions(window):
    """The eager reference (``EagerReference``) at K = 0, fixed anchors, nothing recycled or rectified
    equals the oracle past a filled window and inside an unfilled one: the two share no code."""
    model, inputs = registry.build("gemma3", window=window)
    visual = inputs["input_ids"] == registry.image_token_id(model.config)
    k = kept_count(int(visual[0].sum()), keep_ratio=0.25)
    config = ERAConfig(layer=0, keep_ratio=0.25, strategy=FIXED, recycle=False, rectify=False)
    reference = EagerReference(model, config).generate(**inputs, **greedy(10))
    expected = oracle.generate(model, inputs, visual, k, **greedy(10))
    assert torch.equal(reference.sequences, expected.sequences)
    assert logits_difference(reference, expected) <= TOL
