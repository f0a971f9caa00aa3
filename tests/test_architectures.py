"""The same passes on every zoo architecture: forward and generate against the eager reference."""

from __future__ import annotations

import pytest
import torch
from conftest import build, compiled_forward
from reference import EagerReference

from era_compile import ERAConfig, make_era_backend, zoo

TOL = 1e-4
ARCHITECTURES = ["llava", "llava-next"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_forward_and_generate_match_reference(name):
    model, inputs = build(name, batch=2)
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config)(**inputs)
    greedy = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected_generate = EagerReference(model, config).generate(**inputs, **greedy)

    out, report = compiled_forward(model, inputs, config)
    assert out.logits.shape == expected.logits.shape
    assert (out.logits - expected.logits).abs().max().item() <= TOL
    (site,) = report.pruning
    assert site.kept < site.visual_tokens and site.seq_len_after < site.seq_len_before
    layers = out.past_key_values.layers
    assert [layer.keys.shape[-2] for layer in layers[config.layer:]] == [site.seq_len_after] * (len(layers) - 1)
    assert layers[0].keys.shape[-2] == site.seq_len_before

    torch._dynamo.reset()
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad():
        generated = model.generate(**inputs, **greedy)
    assert torch.equal(generated.sequences, expected_generate.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(generated.logits, expected_generate.logits)) <= TOL
    assert backend.report.decode_rewrites > 0


def test_llava_next_image_newline_tokens_are_pruned_like_visual_tokens():
    """LLaVA-NeXT's image_newline rows sit among the image tokens; with no model-specific code
    they are visual tokens like any other: candidates for pruning, counted in T."""
    model, inputs = build("llava-next")
    T = int((inputs["input_ids"] == zoo.IMAGE_TOKEN_ID).sum())
    newline = model.model.image_newline
    try:  # the same image packed without newline rows: fewer tokens, so newline rows are among the T
        model.model.image_newline = None
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_sizes=inputs["image_sizes"])
    finally:
        model.model.image_newline = newline
    assert features.pooler_output[0].shape[0] < T
    out, report = compiled_forward(model, inputs, ERAConfig(layer=1, compiler="eager", strict=True))
    assert report.pruning[0].visual_tokens == T  # crops' patches and the newline rows together
