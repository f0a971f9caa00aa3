"""A hybrid decoder as Qwen3.5 has it: Gated DeltaNet layers (a short convolution, then a chunked scan)
between softmax-attention layers, three to one. The registry's tiny Qwen3.5 keeps that pattern on 8
layers; it is cut at its first attention layer (3), so the linear layers 4-6 and the attention layer 7
run on the kept tokens, their convolution windows and recurrent states built from those alone.

Here a ragged, left-padded batch of two image sizes (the linear layers hide the padding with a [B, N]
mask, gathered with the rest at the cut) generates the eager reference's tokens, and a K on a linear
layer is refused with the layers it could be. The registry matrix checks every hybrid type (forward,
batch 2, generate) against the reference."""

from __future__ import annotations

import pytest
import torch
from test_split_decoder import ragged_batch

from conftest import generate_matches_reference, greedy, logits_difference
from era_compile import ERAConfig, make_era_backend, registry
from era_compile.reference import EagerReference

pytestmark = pytest.mark.skipif("qwen3_5" not in registry.model_types(), reason="no Qwen3.5 in this transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def qwen3_5():
    model, _ = registry.build("qwen3_5")
    assert registry.hybrid_layers(model) == [0, 1, 2, 4, 5, 6]
    return model


def test_a_ragged_batch_is_cut_at_an_attention_layer_and_generates_the_references_tokens(qwen3_5):
    model = qwen3_5
    inputs = ragged_batch(model)
    assert int(inputs["attention_mask"][1].sum()) < inputs["input_ids"].shape[1]  # the second is padded
    config = ERAConfig(layer=3, keep_ratio=0.25, compiler="eager", strict=True)
    backend = generate_matches_reference(model, inputs, config, max_new_tokens=4, tol=TOL)
    (site,) = backend.report.pruning
    assert site.layer == 3 and [t for t, _ in site.samples] == [16, 8] and site.seq_len_after < site.seq_len_before
    assert backend.report.decode_rewrites > 0


def test_a_k_on_a_linear_layer_is_refused_with_the_attention_layers(qwen3_5):
    model, inputs = qwen3_5, registry.make_inputs(qwen3_5)
    torch._dynamo.reset()
    backend = make_era_backend(ERAConfig(layer=2, compiler="eager", strict=True))
    with pytest.raises(Exception, match=r"layer=2 names a layer without softmax attention .*\[3, 7\]"):
        with torch.no_grad():
            torch.compile(model, backend=backend)(**inputs)


@pytest.mark.skipif("lfm2_vl" not in registry.model_types(), reason="no LFM2-VL in this transformers")
def test_short_convolution_layers_after_the_cut_under_dynamic_shapes():
    """LFM2-VL as its checkpoints configure it (short convolutions between attention layers), compiled with
    ``dynamic=True``: the convolution's ``[..., :seqlen]`` ends at the prompt's length read off a tensor (a
    value of the graph), and after the cut at n'. Two prompt lengths, each the reference's tokens."""
    model, _ = registry.build("lfm2_vl")
    assert registry.hybrid_layers(model) == [0, 1, 3, 4, 6, 7]
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    torch._dynamo.reset()
    backend = make_era_backend(config)
    model.compile(backend=backend, dynamic=True)
    try:
        for prefix in (5, 12):
            inputs = registry.make_inputs(model, prefix=prefix)
            expected = EagerReference(model, config).generate(**inputs, **greedy(4))
            with torch.no_grad():
                generated = model.generate(**inputs, **greedy(4))
            assert torch.equal(generated.sequences, expected.sequences)
            assert logits_difference(generated, expected) <= TOL
    finally:
        model._compiled_call_impl = None
    assert backend.report.pruned_calls == 2
