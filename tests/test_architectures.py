"""The same passes on every zoo architecture: forward and generate against the eager reference."""

from __future__ import annotations

import pytest
import torch
from conftest import build, compiled_forward
from reference import EagerReference

from era_compile import ERAConfig, make_era_backend, zoo

TOL = 1e-4
ARCHITECTURES = ["llava", "llava-next", "qwen2-vl", "qwen2.5-vl"]
SPLIT_FORWARD = {"qwen2-vl", "qwen2.5-vl"}  # a plain forward puts the merge and the decoder in two graphs
GREEDY = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_generate_matches_reference(name):
    model, inputs = build(name, batch=2)
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config).generate(**inputs, **GREEDY)
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad():
        generated = model.generate(**inputs, **GREEDY)
    assert torch.equal(generated.sequences, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(generated.logits, expected.logits)) <= TOL
    (site,) = backend.report.pruning
    assert site.kept < site.visual_tokens and backend.report.decode_rewrites > 0


@pytest.mark.parametrize("name", sorted(set(ARCHITECTURES) - SPLIT_FORWARD))
def test_forward_matches_reference(name):
    model, inputs = build(name, batch=2)
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config)(**inputs)
    out, report = compiled_forward(model, inputs, config)
    assert out.logits.shape == expected.logits.shape
    assert (out.logits - expected.logits).abs().max().item() <= TOL
    (site,) = report.pruning
    assert site.kept < site.visual_tokens and site.seq_len_after < site.seq_len_before
    # with a mask and K >= 1 the pruned layers' cache is aligned to the original positions: the
    # dropped tokens are zero rows (see era_compile.runtime)
    for layer in out.past_key_values.layers[config.layer:]:
        zero_rows = (layer.keys == 0).all(-1).all(1)
        assert zero_rows.sum(-1).tolist() == [site.seq_len_before - site.seq_len_after] * zero_rows.shape[0]



@pytest.mark.parametrize("name", sorted(SPLIT_FORWARD))
def test_split_forward_is_refused_with_the_reason(name):
    """Qwen's plain forward merges the image in one graph and runs the decoder in the next:
    not supported yet, and said so (strict raises; otherwise a warning and an unpruned run)."""
    model, inputs = build(name)
    with pytest.raises(Exception, match="Dynamo split the merge from the decoder"):
        compiled_forward(model, inputs, ERAConfig(layer=1, compiler="eager", strict=True))
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="pruning across graphs is not supported yet"):
        out, report = compiled_forward(model, inputs, ERAConfig(layer=1, compiler="eager"))
    assert not report.pruned
    with torch.no_grad():
        assert torch.allclose(out.logits, model(**inputs).logits, atol=1e-5)


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


def test_eager_attention_model_is_refused_with_the_reason():
    """attn_implementation="eager" leaves no SDPA call to rewrite: refused, and the message says why."""
    model, inputs = build("llava")
    model.set_attn_implementation("eager")
    with pytest.raises(Exception, match="load the model with attn_implementation='sdpa'"):
        compiled_forward(model, inputs, ERAConfig(layer=1, compiler="eager", strict=True))
