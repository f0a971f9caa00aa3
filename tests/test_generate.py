"""generate(): pruned prefill, rectified decode, against the eager reference token for token."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import assert_cache_rows, build
from era_compile import ERAConfig, make_era_backend, recompile_headroom
from era_compile.reference import EagerReference

NEW_TOKENS = 16
TOL = 1e-4
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)

CASES = {
    "batch1": dict(),
    "batch3": dict(batch=3),
    "left_padded": dict(batch=2, left_pad=(0, 3)),
    "two_images": dict(images=2),
}


def _compiled_generate(model, inputs, config, **kwargs):
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad():
        return model.generate(**inputs, **kwargs), backend.report


@pytest.mark.parametrize(
    "case, layer",
    # one prompt at K = 2 is the support matrix's LLaVA generate (tests/test_architectures.py)
    [(case, layer) for case in CASES for layer in (0, 2) if (case, layer) != ("batch1", 2)],
)
def test_greedy_generate_matches_reference(case, layer):
    """Token for token and logit for logit, prefill and every decode step. Where the cut is inside
    the decoder (K = 2) on two left-padded prompts, the same generation also shows the decode check
    has teeth: the reference without the decode's LAR bias is visibly off."""
    model, inputs = build("llava", **CASES[case])
    config = ERAConfig(layer=layer, keep_ratio=0.25, compiler="eager", strict=True)
    expected = EagerReference(model, config).generate(**inputs, **GREEDY)
    out, report = _compiled_generate(model, inputs, config, **GREEDY)
    assert out.sequences.shape == expected.sequences.shape
    assert torch.equal(out.sequences, expected.sequences)
    assert report.pruned and report.decode_rewrites > 0
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, expected.logits, strict=True)) <= TOL
    if layer == 2 and case == "left_padded":
        without_decode_bias = EagerReference(model, config, drop_decode_bias=True).generate(**inputs, **GREEDY)
        decode = slice(1, None)  # logits[0] is the prefill's last position; the rest are decode steps
        # strict=False: a generate that meets EOS stops early
        teeth = max(
            (a - b).abs().max().item()
            for a, b in zip(out.logits[decode], without_decode_bias.logits[decode], strict=False)
        )
        assert teeth > 10 * TOL, "dropping the bias in decode should be visible; the check would pass anyway"
    if case == "left_padded":  # layers >= K hold n' rows plus one per decode step, never N; layers < K all N (+ t)
        assert_cache_rows(model, inputs, out, report, layer)


def test_inductor_generate_matches_reference():
    model, inputs = build("llava", batch=2, left_pad=(0, 3))
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="inductor", strict=True)
    expected = EagerReference(model, config).generate(**inputs, **GREEDY)
    out, _ = _compiled_generate(model, inputs, config, **GREEDY)
    assert torch.equal(out.sequences, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, expected.logits, strict=True)) <= TOL


def test_no_recompiles_after_two_decode_steps_nor_for_a_second_image():
    """The backend compiles exactly the graphs a plain compile does (HF's own breaks: 4 prefill
    graphs on transformers 5.23, 7 on 5.17), then one graph each for decode steps 1 and 2, and
    nothing more: not for the rest of a generation, not for another image of the same size."""

    def first_generation(backend):
        model, inputs = build("llava")
        model.compile(backend=backend)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)  # prefill, decode steps 1 and 2
        return model, inputs

    plain = []
    first_generation(lambda gm, example_inputs: plain.append(gm) or gm.forward)
    torch._dynamo.reset()
    backend = make_era_backend(ERAConfig(layer=2, compiler="eager", strict=True))
    model, inputs = first_generation(backend)
    after_two_steps = backend.report.graphs
    _, other = build("llava", seed=5)  # same sizes, another image and other words
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        model.generate(**other, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert after_two_steps == len(plain)
    assert backend.report.graphs == after_two_steps
    assert len(backend.report.pruning) == 1


def test_text_only_generate_is_untouched_and_quiet():
    model, _ = build("llava")
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    backend = make_era_backend(ERAConfig(layer=2, compiler="eager", strict=True))
    model.compile(backend=backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected)
    assert not backend.report.pruned


@pytest.mark.parametrize("layer", [0, 2])
def test_beam_search_keeps_the_bias_through_the_reordered_cache(layer):
    """Beam search reorders the cache between steps (``index_select`` on the batch): a pruned
    layer's CompactKV reorders its rows' positions and bias with its rows, so every beam keeps
    its anchors' bias. Two prompts, two beams each, against the reference, never a warning."""
    model, inputs = build("llava", batch=2)
    config = ERAConfig(layer=layer, compiler="eager", strict=True)
    beams = dict(max_new_tokens=6, do_sample=False, num_beams=2)
    expected = EagerReference(model, config).generate(**inputs, **beams)
    backend = make_era_backend(config)
    model.compile(backend=backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = model.generate(**inputs, **beams)
    assert torch.equal(out, expected)
    assert backend.report.pruned and backend.report.decode_rewrites > 0


def test_image_token_mismatch_gives_the_models_own_error():
    model, inputs = build("llava")
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)  # two images, one image's tokens
    backend = make_era_backend(ERAConfig(layer=2, compiler="eager", strict=True))
    # HF's own check: its message, or torch._check's when it runs inside compiled code
    with (
        torch.no_grad(),
        pytest.raises(Exception, match="Image features and image tokens do not match|Expected cond to be True") as info,
    ):
        torch.compile(model, backend=backend)(**inputs)
    assert "era_compile" not in str(info.value)


@pytest.mark.parametrize("layer", [0, 2])
def test_prompts_of_other_lengths_and_batch_sizes_stay_pruned(layer):
    """A server's traffic: new lengths and batch sizes make Dynamo recompile the prefill as a
    dynamic graph (symbolic N and B), and the decode graphs recompile too. Every request must
    still be pruned and match the reference; none may fall back to eager past a recompile limit."""
    model, first = build("llava")
    prompts = [
        first,
        build("llava", suffix=10, seed=3)[1],
        build("llava", batch=2, seed=4)[1],
        build("llava", batch=3, suffix=9, left_pad=(0, 2, 4), seed=6)[1],
    ]
    config = ERAConfig(layer=layer, keep_ratio=0.25, compiler="eager", strict=True)
    greedy = dict(GREEDY, max_new_tokens=8)
    expected = [EagerReference(model, config).generate(**p, **greedy) for p in prompts]
    backend = make_era_backend(config)
    model.compile(backend=backend)
    limit = torch._dynamo.config.recompile_limit
    with torch.no_grad(), recompile_headroom():  # a server's opt-in: four shapes' prefills and decodes
        for p, ref in zip(prompts, expected, strict=True):
            out = model.generate(**p, **greedy)
            assert torch.equal(out.sequences, ref.sequences)
            assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) <= TOL
    report = backend.report
    assert {p.seq_len_before for p in report.pruning} >= {48, 51}  # the static and a dynamic prefill
    assert not any("did not happen" in s for s in report.skipped)
    assert torch._dynamo.config.recompile_limit == limit  # the headroom was the block's alone


def test_static_cache_is_refused_by_name_and_runs_unpruned():
    """A static cache is written in place at the original positions: a pruning prefill over it is
    refused (strict: an error naming it), otherwise the model runs unpruned and says so."""
    model, inputs = build("llava")
    greedy = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(**inputs, **greedy)
    model.compile(backend=make_era_backend(ERAConfig(layer=2, compiler="eager", strict=True)))
    with torch.no_grad(), pytest.raises(Exception, match=r"cache_implementation='static'"):
        model.generate(**inputs, **greedy)
    torch._dynamo.reset()
    backend = make_era_backend(ERAConfig(layer=2, compiler="eager"))
    model.compile(backend=backend)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"cache_implementation='static'"):
        out = model.generate(**inputs, **greedy)
    assert torch.equal(out, expected) and not backend.report.pruned
    assert any("cache_implementation='static'" in s for s in backend.report.skipped)


def test_a_hand_called_decode_step_over_the_compact_cache():
    """A decode step called by hand with an all-ones mask at K = 2 (transformers 5.17 keeps such a
    mask in generate(); 5.24 drops it): HF sizes the mask from layer 0's N + 1 keys, the pruned
    layers attend over their n' stored rows at their original positions. The next token's logits
    equal the reference's, whose cache is compact too."""
    from era_compile.compact_kv import stored_rows
    from era_compile.compat import cache_kwarg, output_cache

    model, inputs = build("llava")
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    N = inputs["input_ids"].shape[1]
    step = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, N + 1, dtype=torch.long)}
    key = cache_kwarg(model.forward)
    reference = EagerReference(model, config)
    with torch.no_grad(), reference.active(inputs["input_ids"]):
        first = model(**inputs)
        expected = model(**step, **{key: output_cache(first)}).logits
    backend = make_era_backend(config)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        cache = output_cache(compiled(**inputs))
        out = compiled(**step, **{key: cache}).logits
    site = backend.report.pruning[0]
    assert [stored_rows(layer.keys) for layer in cache.layers] == [N + 1] * 2 + [site.seq_len_after + 1] * 2
    assert backend.report.decode_rewrites == 2
    assert (out[:, -1] - expected[:, -1]).abs().max().item() <= TOL


@pytest.mark.parametrize("layer", [0, 2])
def test_rectify_false_generates_as_the_reference_without_lar_in_prefill_and_decode(layer):
    """``rectify=False``: greedy generate() equals the eager reference run with rectify=False, token
    for token and logit for logit, in the prefill and in every decode step over the pruned caches
    (which hold the kept tokens and carry no LAR bias). The rectified reference decodes otherwise,
    so a bias that reached the decode would be seen."""
    from era_compile.compact_kv import CompactKV
    from era_compile.compat import output_cache

    model, inputs = build("llava")
    config = ERAConfig(layer=layer, keep_ratio=0.25, rectify=False, compiler="eager", strict=True)
    greedy = dict(GREEDY, max_new_tokens=4)
    expected = EagerReference(model, config).generate(**inputs, **greedy)
    rectified = EagerReference(model, config.replace(rectify=True)).generate(**inputs, **greedy)
    out, report = _compiled_generate(model, inputs, config, **greedy)
    assert torch.equal(out.sequences, expected.sequences)
    decode = slice(1, None)  # logits[0] is the prefill's last position; the rest are decode steps
    assert len(out.logits[decode]) == 3
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, expected.logits, strict=True)) <= TOL
    # strict=False: the rectified tokens may differ, and a generate that meets EOS stops early
    teeth = max(
        (a - b).abs().max().item() for a, b in zip(rectified.logits[decode], expected.logits[decode], strict=False)
    )
    assert teeth > 10 * TOL, "the LAR bias should change the decode; the check would pass anyway"
    N = inputs["input_ids"].shape[1]
    site = report.pruning[0]
    pruned_layers = output_cache(out).layers[layer:]
    assert site.seq_len_after < N and all(isinstance(c.keys, CompactKV) for c in pruned_layers)
    assert all(c.keys.stored_rows == site.seq_len_after + 3 for c in pruned_layers)  # kept + generated rows
    assert all(bool((c.keys.bias == 0).all()) for c in pruned_layers)  # no bias reaches the decode
