"""The same passes on every zoo architecture: forward and generate against the eager reference."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import build, compiled_forward, generate_matches_reference
from era_compile import EraCompileError, ERAConfig, make_era_backend, zoo
from era_compile.compact_kv import stored_rows
from era_compile.compat import output_cache
from era_compile.reference import EagerReference

TOL = 1e-4
ARCHITECTURES = list(zoo.architectures())
SPLIT_FORWARD = {"qwen2-vl", "qwen2.5-vl"}  # a plain forward merges in one graph, decodes in the next


# The support matrix: scripts/support_matrix.py runs these and writes the table in docs/support.md from
# their outcomes. A column is a mode; "batch 2" runs both forward and generate on two samples.
MATRIX_MODES = ["forward", "generate", "batch 2"]


@pytest.mark.parametrize("mode", MATRIX_MODES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_support_matrix(name, mode):
    batch = 2 if mode == "batch 2" else 1
    if mode != "generate":
        check_forward(name, batch)
    if mode != "forward":
        check_generate(name, batch)


def check_forward(name, batch):
    model, inputs = build(name, batch=batch)
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config)(**inputs)
    out, report = compiled_forward(model, inputs, config)
    assert out.logits.shape == expected.logits.shape
    assert (out.logits - expected.logits).abs().max().item() <= TOL
    (site,) = report.pruning
    assert site.kept == config.kept(site.visual_tokens) < site.visual_tokens
    assert site.seq_len_after < site.seq_len_before
    assert report.handoffs == (1 if name in SPLIT_FORWARD else 0)
    # the pruned layers' cache stores the n' kept rows (a CompactKV as long as the original N:
    # what HF's one decode mask expects); the layers before K hold all N
    cache = output_cache(out).layers
    assert [stored_rows(layer.keys) for layer in cache] == [site.seq_len_before] * config.layer + [
        site.seq_len_after
    ] * (len(cache) - config.layer)
    assert all(layer.keys.shape[-2] == site.seq_len_before for layer in cache)


def check_generate(name, batch):
    model, inputs = build(name, batch=batch)
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    backend = generate_matches_reference(model, inputs, config, tol=TOL)
    (site,) = backend.report.pruning
    assert site.kept < site.visual_tokens and backend.report.decode_rewrites > 0


def test_split_forward_compiles_one_pruned_variant_for_every_visual_count():
    """Qwen's plain forward merges in one graph and runs the decoder in another. Prompts of the
    same length with different image sizes reach a decoder graph carrying different T: one pruned
    variant of that graph serves both (T, k and n' are the data's), and every request matches
    the reference.

    Which Dynamo graph a request lands in is transformers' business: up to 5.23 the decoder's
    graph never saw the image size, so the second T reached the first graph; from 5.24 the model
    output carries the vision tower's output (``image_outputs``), so the decoder's frame guards
    on its size and recompiles once (dynamic in it), and the third request reaches that graph."""
    model, _ = build("qwen2.5-vl")
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    backend = make_era_backend(config)
    compiled = torch.compile(model, backend=backend)
    entry = zoo.ZOO["qwen2.5-vl"]
    for grid, prefix in (((1, 12, 12), 5), ((1, 8, 8), 25), ((1, 12, 12), 5)):  # 36, 16, 36 visual; all 50 long
        inputs = entry.make_inputs(model, grid=grid, prefix=prefix)
        with torch.no_grad():
            out = compiled(**inputs)
        expected = EagerReference(model, config)(**inputs)
        assert out.logits.shape == expected.logits.shape
        assert (out.logits - expected.logits).abs().max().item() <= TOL
    first, second = backend.report.pruning[:2]
    assert (first.visual_tokens, second.visual_tokens) == (36, 16)
    graphs = {}
    for site in backend.report.pruning:
        graphs.setdefault(site.graph, set()).add(site.visual_tokens)
    assert {16, 36} in graphs.values()  # one Dynamo graph, one pruned variant of it
    pruned_variants = [[v for v in vs if v != "unpruned"] for vs in backend.report.variants.values()]
    assert all(len(v) <= 1 for v in pruned_variants) and any(pruned_variants), backend.report.variants
    assert backend.report.handoffs == 2  # the merge graph, static then dynamic in the image size


def test_unclaimed_handoff_is_reported():
    """Merged embeddings replaced outside any graph before the decoder: the mask handed on is never
    taken up, and the user is told as the decoder runs on the copy (strict: an error there), once:
    the handed-on tensor's death does not tell again."""
    model, inputs = build("qwen2.5-vl")

    @torch._dynamo.disable
    def copy_outside_the_graph(x):
        return x.clone()

    def replace_embeddings(module, args, kwargs):
        kwargs["inputs_embeds"] = copy_outside_the_graph(kwargs["inputs_embeds"])
        return args, kwargs

    model.model.language_model.register_forward_pre_hook(replace_embeddings, with_kwargs=True)
    told = "merged an image prompt and handed its visual mask on, but graph \\d+ ran the language model on other"
    with pytest.warns(RuntimeWarning, match=told):
        out, report = compiled_forward(model, inputs, ERAConfig(layer=1, compiler="eager"))
        del out
        gc.collect()
    assert not report.pruned and len(report.unpruned_images) == 1
    assert not any("no compiled graph received" in line for line in report.skipped)
    with pytest.raises(EraCompileError, match=told):
        compiled_forward(model, inputs, ERAConfig(layer=1, compiler="eager", strict=True))


@pytest.mark.parametrize("name", ["llava", "qwen2.5-vl"])
def test_cold_first_call(name):
    """Cold: the compiled call is the model's first, so transformers installs its output hooks
    inside it (more graph breaks: 7 graphs for LLaVA instead of 4). The warm case (the model ran
    eagerly before) is every matrix test: the reference runs first. Both calls prune and match."""
    model, inputs = build(name)
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    backend = make_era_backend(config)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        outs = [compiled(**inputs) for _ in range(2)]
    expected = EagerReference(model, config)(**inputs)
    for out in outs:
        assert (out.logits - expected.logits).abs().max().item() <= TOL
    (site,) = backend.report.pruning
    assert site.kept < site.visual_tokens


def test_video_frames_are_one_selection_pool():
    """LLaVA-OneVision video: every frame's tokens (and the trailing image_newline) of a sample
    compete in one selection; the budget is taken over all of them, not per frame."""
    frames = 4
    model, inputs = build("llava-onevision", frames=frames)
    config = ERAConfig(layer=1, keep_ratio=0.25, compiler="eager", strict=True)
    out, report = compiled_forward(model, inputs, config)
    (site,) = report.pruning
    per_frame = int((inputs["input_ids"] == zoo.VIDEO_TOKEN_ID).sum() - 1) // frames
    assert site.visual_tokens == frames * per_frame + 1
    assert site.kept == config.kept(site.visual_tokens) != frames * config.kept(per_frame)


def test_llava_next_image_newline_tokens_are_pruned_like_visual_tokens():
    """LLaVA-NeXT's image_newline rows sit among the image tokens; with no model-specific code
    they are visual tokens like any other: candidates for pruning, counted in T."""
    model, inputs = build("llava-next")
    T = int((inputs["input_ids"] == zoo.IMAGE_TOKEN_ID).sum())
    newline = model.model.image_newline
    try:  # the same image packed without newline rows: fewer tokens, so newline rows are among the T
        model.model.image_newline = None
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            )
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_llava_7b_shape_says_it_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        zoo.build("llava-7b-shape")
    assert "llava-7b-shape" not in zoo.architectures()  # a benchmark shape, not a matrix row
