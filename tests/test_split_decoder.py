"""A real decoder that Dynamo splits into per-layer graphs: the registry's tiny Qwen3-VL (DeepStack's
``h[visual_mask] + features`` in the layer loop). Its layers from K run the prefill on the kept tokens,
each cut at its entry and written back at its exit (``passes/kept.py``, ``passes/restore.py``): a ragged,
left-padded batch generates the eager reference's tokens, and those layers cost the reference's cut."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_cache_rows
from era_compile import ERAConfig, make_era_backend, registry
from era_compile.bench import _module_path, register_cpu_sdpa_flops
from era_compile.reference import EagerReference, decoder_of

pytestmark = pytest.mark.skipif("qwen3_vl" not in registry.model_types(), reason="no Qwen3-VL in this transformers")

TOL = 1e-4
GREEDY = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def ragged_batch(model, grids=((1, 8, 8), (1, 4, 8)), prefix: int = 5, suffix: int = 7, seed: int = 3) -> dict:
    """Two prompts with one image each, of other sizes (``grids``: (t, h, w) in patches), the shorter
    left-padded to the longer, in the form Qwen3-VL's processor gives them."""
    config, vision = model.config, model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    image = registry.image_token_id(config)
    merge = vision.spatial_merge_size
    rows = []
    for t, h, w in grids:
        text = [torch.randint(*registry.TEXT_VOCAB, (n,), generator=g) for n in (prefix, suffix)]
        visual = torch.full((t * h * w // merge**2,), image)
        start, end = torch.tensor([config.vision_start_token_id]), torch.tensor([config.vision_end_token_id])
        rows.append(torch.cat([text[0], start, visual, end, text[1]]))
    width = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([r.new_zeros(width - len(r)), r]) for r in rows])
    attention_mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    patches = sum(t * h * w for t, h, w in grids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(patches, patch_dim, generator=g),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": (input_ids == image).long(),
    }


def test_a_ragged_left_padded_batch_generates_the_references_tokens():
    """16 and 8 visual tokens, the second prompt left-padded by 8: each sample keeps its own budget,
    the kept sequences are laid out to the longest (the shorter one begins with empty slots), every
    layer from K gathers and writes back that layout, and the greedy tokens and logits are the eager
    reference's; the layers from K cache n' rows (and the generated ones), layer 0 all N."""
    model, _ = registry.build("qwen3_vl")
    inputs = ragged_batch(model)
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config).generate(**inputs, **GREEDY)
    torch._dynamo.reset()
    backend = make_era_backend(config)
    model.compile(backend=backend)
    try:
        with torch.no_grad():
            generated = model.generate(**inputs, **GREEDY)
        assert_cache_rows(model, inputs, generated, backend.report, config.layer)
    finally:
        model._compiled_call_impl = None
    assert torch.equal(generated.sequences, expected.sequences)
    error = max((a - b).abs().max().item() for a, b in zip(generated.logits, expected.logits, strict=True))
    assert error <= TOL
    (site, *_) = backend.report.pruning
    assert [t for t, _ in site.samples] == [16, 8] and [k for _, k in site.samples] == [4, 2]
    N = inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].sum(-1).tolist()
    assert site.seq_len_after == max(L - T + k for L, (T, k) in zip(real, site.samples, strict=True)) < N
    assert backend.report.decode_rewrites > 0


def test_the_prefill_of_layers_from_k_costs_the_references_cut(graph_calls):
    """Counted as the graphs run (FlopCounterMode), each layer graph from K (it recycles, or reads
    what layer K kept) costs what the eager reference's cut layers after K cost at n' (K's own count
    there adds its selection's), far below a layer at N; the layers before K cost a layer at N."""
    model, inputs = registry.build("qwen3_vl")
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    torch._dynamo.reset()
    backend = make_era_backend(config)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    site = backend.report.pruning[0]
    assert (site.seq_len_before, site.seq_len_after) == (30, 18)

    register_cpu_sdpa_flops()
    layers = decoder_of(model).layers
    per_layer = {}
    for name, run in (("cut", EagerReference(model, config)), ("unpruned", model)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run(**inputs)
        counts = counter.get_flop_counts()
        per_layer[name] = [sum(counts[_module_path(model, layer)].values()) for layer in layers]
    cut_after_k = per_layer["cut"][config.layer + 1 :]
    assert len(set(cut_after_k)) == 1  # a layer at n' each
    from_k = [c.flops for c in graph_calls if c.era_ops & {"recycle", "kept_tokens"}]
    assert from_k == cut_after_k[:1] * (len(layers) - config.layer)
    assert from_k[0] < per_layer["unpruned"][config.layer]
