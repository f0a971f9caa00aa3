"""Compiled pruned LLaVA against the eager reference of the same algorithm."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from conftest import build, compiled_forward, generate_matches_reference
from era_compile import ERAConfig, era_backend, last_report, make_era_backend, zoo
from era_compile.compact_kv import CompactKV, stored_rows
from era_compile.compat import output_cache
from era_compile.reference import EagerReference

TOL = 1e-4  # fp32, compiled vs eager reference (issue 2)


def _reference(model, inputs, config):
    return EagerReference(model, config)(**inputs)


@pytest.mark.parametrize("layer", [0, 2])
def test_pruned_logits_match_reference(layer):
    """Both keep ratios through one compiled model: the budget is an input of the graph. The cache
    each call returns: at K = 0 every layer ran on the kept tokens and stores exactly them; at K >= 1
    (with an attention mask, HF sizes its one decode mask from layer 0's N keys) the pruned layers'
    caches are as long as N (CompactKV) and store only their n' kept rows, each at its original
    position, and the layers before K hold all N. K = 1 at a quarter kept is the support matrix's
    LLaVA forward (tests/test_architectures.py), with the same cache checks."""
    model, inputs = build("llava")
    config = ERAConfig(keep_ratio=0.25, layer=layer, compiler="eager", strict=True)
    backend = make_era_backend(config)
    compiled = torch.compile(model, backend=backend)
    T, N, graphs = zoo.num_visual_tokens(model), inputs["input_ids"].shape[1], []
    for keep_ratio in (0.25, 0.5):
        at_ratio = config.replace(keep_ratio=keep_ratio)
        reference = EagerReference(model, at_ratio)
        expected = reference(**inputs).logits
        with torch.no_grad(), backend.budget(keep_ratio=keep_ratio):
            out = compiled(**inputs)
        n_after = N - T + at_ratio.kept(T)
        assert expected.shape[1] == n_after
        assert out.logits.shape == expected.shape
        assert (out.logits - expected).abs().max().item() <= TOL
        site = backend.report.pruning[-1]
        assert (site.layer, site.visual_tokens, site.kept, site.seq_len_after) == (layer, T, at_ratio.kept(T), n_after)
        graphs.append(backend.report.graphs)
        cache = output_cache(out).layers
        assert [stored_rows(c.keys) for c in cache] == [N] * layer + [n_after] * (len(cache) - layer)
        for c in cache[layer:] if layer else ():
            assert isinstance(c.keys, CompactKV) and c.keys.shape[-2] == N
            assert stored_rows(c.values) == n_after
            assert torch.equal(c.keys.positions, reference.last["keep_index"])
    report = backend.report
    assert report.pruned_calls == 2 and graphs[0] == graphs[1]  # the second ratio compiled nothing
    assert report.attention_rewrites == model.config.text_config.num_hidden_layers - layer


def test_inductor_matches_reference_at_k0():
    model, inputs = build("llava")
    config = ERAConfig(keep_ratio=0.25, layer=0, compiler="inductor", strict=True)
    expected = _reference(model, inputs, config).logits
    out, report = compiled_forward(model, inputs, config)
    assert out.logits.shape == expected.shape
    assert (out.logits - expected).abs().max().item() <= TOL
    assert report.pruned


def test_registered_name_is_the_default_config_through_inductor(caplog):
    """``backend="era"``: the default config (K = 2, a quarter kept, Inductor), equal to the
    reference; its report is ``last_report()``, in the documented fields, and the pass log says
    where it pruned."""
    model, inputs = build("llava")
    expected = _reference(model, inputs, ERAConfig()).logits
    with caplog.at_level(logging.INFO, logger="era_compile"), torch.no_grad():
        out = torch.compile(model, backend="era")(**inputs)
    assert out.logits.shape == expected.shape
    assert (out.logits - expected).abs().max().item() <= TOL
    report = last_report()
    assert report is not None and report.pruned and era_backend.config == ERAConfig()  # compiler="inductor"
    d = report.to_dict()
    for key in ("graphs", "pruning", "pruned_calls", "attention_rewrites", "kernel", "skipped"):
        assert key in d
    entry = d["pruning"][0]
    for key in ("layer", "visual_tokens", "kept", "seq_len_before", "seq_len_after"):
        assert key in entry
    assert entry["layer"] == 2 and out.logits.shape[1] == entry["seq_len_after"] and d["pruned_calls"] == 1
    assert any("prunes at layer" in r.getMessage() for r in caplog.records)


def test_prompt_length_equal_to_hidden_size():
    """N == hidden size (64): a rewrite that changed every 64 would break or corrupt the model."""
    model, inputs = build("llava", prefix=5, suffix=23)
    assert inputs["input_ids"].shape[1] == model.config.text_config.hidden_size
    config = ERAConfig(keep_ratio=0.25, layer=1, compiler="eager", strict=True)
    expected = _reference(model, inputs, config).logits
    out, _ = compiled_forward(model, inputs, config)
    assert out.logits.shape == expected.shape
    assert (out.logits - expected).abs().max().item() <= TOL


def test_keep_all_without_rectify_equals_plain_compile():
    model, inputs = build("llava")
    with torch.no_grad():
        plain = torch.compile(model, backend="eager")(**inputs).logits
    torch._dynamo.reset()
    out, report = compiled_forward(
        model, inputs, ERAConfig(keep_ratio=1.0, layer=1, rectify=False, compiler="eager", strict=True)
    )
    assert report.pruned and report.pruning[0].kept == report.pruning[0].visual_tokens
    assert out.logits.shape == plain.shape
    assert (out.logits - plain).abs().max().item() <= 1e-6


def test_two_configs_never_share_a_compiled_graph_and_rectification_is_not_a_no_op():
    """The same selection with and without the LAR bias, compiled one after the other with Dynamo's
    cache live: the second config compiles its own graph (its attention rewritten with a bias that
    only blocks empty slots), its logits are the reference's without the bias, and they differ from
    the rectified ones (LAR changes the output)."""
    model, inputs = build("llava")
    a, b = (
        ERAConfig(layer=1, compiler="eager", strict=True),
        ERAConfig(layer=1, rectify=False, compiler="eager", strict=True),
    )
    assert a.cache_key() != b.cache_key()
    with_bias, rep_a = compiled_forward(model, inputs, a)
    without, rep_b = compiled_forward(model, inputs, b)  # no reset: Dynamo's cache is live
    assert rep_b.pruned and rep_a.attention_rewrites == rep_b.attention_rewrites > 0
    assert rep_b.passes  # the second config compiled graphs of its own
    assert (without.logits - _reference(model, inputs, b).logits).abs().max().item() <= TOL
    assert (with_bias.logits - _reference(model, inputs, a).logits).abs().max().item() <= TOL
    assert (with_bias.logits - without.logits).abs().max().item() > 1e-3


def test_batch_of_two_samples_prunes_each_its_own_way():
    """Two images in a batch: each sample keeps its own anchors (the gathers are per sample). With
    no attention_mask, SDPA runs with is_causal and GQA, no mask to gather; with the bool mask, this
    batch is the support matrix's LLaVA "batch 2" forward (tests/test_architectures.py)."""
    model, inputs = build("llava", batch=2)
    inputs.pop("attention_mask")
    config = ERAConfig(keep_ratio=0.25, layer=1, compiler="eager", strict=True)
    reference = EagerReference(model, config)
    expected = reference(**inputs).logits
    keep = reference.last["keep_index"]
    assert not torch.equal(keep[0], keep[1]), "both samples kept the same positions: the test lost its teeth"
    out, report = compiled_forward(model, inputs, config)
    assert out.logits.shape == expected.shape == (2, report.pruning[0].seq_len_after, expected.shape[-1])
    assert (out.logits - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("kernel", ["flex", "triton"])
def test_every_cpu_kernel_serves_the_backend(kernel):
    """The rewritten graph with each attention kernel that runs on CPU (triton through the
    interpreter), prefill and decode, against the reference."""
    model, inputs = build("llava")
    config = ERAConfig(layer=1, attention=kernel, compiler="eager", strict=True)
    backend = generate_matches_reference(model, inputs, config, max_new_tokens=4)
    assert backend.report.kernel == kernel and backend.report.decode_rewrites > 0


def test_augmented_flash_kernel_serves_a_maskless_prefill():
    """sdpa_flash takes no model mask. Without attention_mask, transformers 5.23 calls SDPA's
    causal path (no mask): the kernel runs and matches the reference. 5.17 builds a mask even
    then: the backend must say why it did not prune, and run the model unpruned."""
    model, inputs = build("llava")
    inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    config = ERAConfig(layer=1, attention="sdpa_flash", compiler="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, report = compiled_forward(model, inputs, config)
    if report.pruned:
        expected = _reference(model, inputs, config).logits
        assert (out.logits - expected).abs().max().item() <= TOL and report.kernel == "sdpa_flash"
    else:
        assert any("kernel='sdpa_flash' takes no attention mask" in s for s in report.skipped)
        with torch.no_grad():
            assert torch.allclose(out.logits, model(**inputs).logits, atol=1e-5)


def test_kernel_that_cannot_take_the_models_mask_is_refused_with_the_reason():
    model, inputs = build("llava")  # with attention_mask: SDPA gets a bool mask
    with pytest.raises(Exception, match="kernel='sdpa_flash' takes no attention mask"):
        compiled_forward(model, inputs, ERAConfig(layer=1, attention="sdpa_flash", compiler="eager", strict=True))


def test_the_report_keeps_the_budget_rules_count_of_36_visual_tokens():
    """The compiled tiny LLaVA (36 visual tokens) keeps what the budget rule says (ALGORITHMS.md
    2.2; counts written by hand): keep_ratio=0.3 (the config's), 0.3 * 36 = 10.8 rounds to 11;
    0.01 * 36 = 0.36 keeps the floor's one; keep_tokens=50 keeps all 36, and then the model is the
    plain one (k = T, no bias: section 9, identity pruning). One compile: the budget is an input."""
    from era_compile import make_era_backend

    model, inputs = build("llava")
    T, N = zoo.num_visual_tokens(model), inputs["input_ids"].shape[1]
    assert T == 36
    config = ERAConfig(layer=1, keep_ratio=0.3, compiler="eager", strict=True)
    backend = make_era_backend(config)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        plain = model(**inputs).logits
        lengths = [compiled(**inputs).logits.shape[1]]
        for budget in (dict(keep_ratio=0.01), dict(keep_tokens=50)):
            with backend.budget(**budget):
                out = compiled(**inputs)
            lengths.append(out.logits.shape[1])
    sites = backend.report.pruning
    assert [(p.visual_tokens, p.kept, p.seq_len_after) for p in sites] == [(36, k, N - 36 + k) for k in (11, 1, 36)]
    assert lengths == [N - 36 + k for k in (11, 1, 36)]
    assert (out.logits - plain).abs().max().item() <= TOL  # keep_tokens=50: every token, no bias
