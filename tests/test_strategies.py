"""EntropyPrune, FastV, DivPrune and random: exact properties, and each end to end through the
compiled pipeline against the eager reference; the layer-averaged budget; calibration and
layer="auto"."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build, compiled_forward
from era_compile import ERAConfig, keep_tokens_for_layer_average
from era_compile.algorithms import Selection, SelectionInputs, run_strategy
from era_compile.algorithms.baselines import farthest_point_selection
from era_compile.algorithms.entropyprune import (
    covariance_eigenvalues,
    entropy_collapse_layer,
    entropyprune_scores,
    head_gram_eigenvalues,
)
from era_compile.calibrate import calibrate, write_profile, zoo_samples
from era_compile.reference import EagerReference

STRATEGIES = ["era", "entropyprune", "fastv", "divprune", "random"]


def _queries(B=2, H=8, T=20, d=16, seed=0):
    return torch.randn(B, H, T, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.7


# --------------------------------------------------------------------------- EntropyPrune


def test_entropyprune_score_is_the_closed_form():
    """s = tau (H(p) - ln tau) / ln H with tau = tr A, p = rho / tau (ALGORITHMS.md §3.3.1)."""
    q = _queries()
    H = q.shape[1]
    rho = head_gram_eigenvalues(q.transpose(1, 2)).clamp_min(1e-10)
    tau = rho.sum(-1)
    p = rho / tau[..., None]
    spectral = -(p * p.log()).sum(-1)
    closed = tau * (spectral - tau.log()) / math.log(H)
    assert torch.allclose(entropyprune_scores(q), closed, rtol=1e-9, atol=1e-8)
    normalised = entropyprune_scores(q, trace_normalize=True)
    assert torch.allclose(normalised, spectral / math.log(H), atol=1e-12)
    assert not torch.allclose(normalised, entropyprune_scores(q), atol=1e-3)  # the knob matters


def _rope(x, positions, theta=10000.0):
    """Rotate pairs (i, i + d/2) of x [B, H, T, d] by position-dependent angles, as RoPE does."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions[:, None].double() * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_entropyprune_pre_and_post_rope_queries_score_the_same():
    q = _queries(T=12)
    rotated = _rope(q, torch.arange(100, 112))
    assert not torch.allclose(rotated, q)
    assert torch.allclose(entropyprune_scores(rotated), entropyprune_scores(q), rtol=1e-9, atol=1e-10)


def test_dual_gram_eigenvalues_are_the_covariance_nonzero_spectrum():
    m = _queries(B=1, H=6, T=5, d=16)[0].transpose(0, 1)  # [T, H, d]: H < d
    dual = head_gram_eigenvalues(m)  # [T, H]
    direct = covariance_eigenvalues(m)  # [T, d]
    assert torch.allclose(dual, direct[:, -6:], rtol=1e-9, atol=1e-12)
    assert direct[:, :-6].abs().max() < 1e-12  # the rest of the d x d spectrum is zero


def test_head_gram_op_compiles_without_a_graph_break():
    m = _queries(B=1, H=4, T=6, d=8)[0].float()
    torch.library.opcheck(torch.ops.era.head_gram_eigvalsh.default, (m,))
    compiled = torch.compile(lambda x: torch.ops.era.head_gram_eigvalsh(x * 2.0).sum(-1), fullgraph=True)
    assert torch.allclose(compiled(m), head_gram_eigenvalues(m * 2.0).sum(-1))


# --------------------------------------------------------------------------- baselines


def _inputs(hidden, last_query=None):
    return SelectionInputs(
        hidden=hidden,
        queries_fn=lambda: torch.zeros(hidden.shape[0], 1, hidden.shape[1], 4),
        saliency_fn=lambda: None,
        last_query_fn=lambda: last_query,
    )


def test_fastv_keeps_what_the_last_token_attends_to_most():
    attention = torch.rand(2, 4, 10, generator=torch.Generator().manual_seed(3))
    sel = run_strategy("fastv", _inputs(torch.randn(2, 10, 8), attention), 3, {})
    expected = attention.mean(1).topk(3).indices.sort().values
    assert torch.equal(sel.anchors, expected) and sel.confidence is None


def test_divprune_takes_one_token_per_cluster_first():
    """Four tight clusters in four orthogonal directions: max-min diversity picks one from each."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16)
    x = (centres.repeat_interleave(5, 0) + 0.01 * torch.randn(20, 16, generator=g))[None]
    anchors = farthest_point_selection(x, 4)[0]
    assert sorted((anchors // 5).tolist()) == [0, 1, 2, 3]


def test_random_is_seeded():
    x = torch.randn(2, 30, 8)
    a = run_strategy("random", _inputs(x), 6, {"seed": 1}).anchors
    assert torch.equal(a, run_strategy("random", _inputs(x), 6, {"seed": 1}).anchors)
    assert not torch.equal(a, run_strategy("random", _inputs(x), 6, {"seed": 2}).anchors)


def test_layer_averaged_budget_matches_entropyprune():
    """L = 32, K = 2, T = 576: averages 192 / 128 / 64 keep 166 / 98 / 29 (ALGORITHMS.md §2.2)."""
    assert [keep_tokens_for_layer_average(a, 576, 2, 32) for a in (192, 128, 64)] == [166, 98, 29]
    with pytest.raises(ValueError, match="cannot be met"):
        keep_tokens_for_layer_average(10, 576, 2, 32)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "strategy, recycle_and_rectify",
    # ERA with BTR + LAR on this batch is the support matrix's LLaVA "batch 2" forward
    # (tests/test_architectures.py), the same compile with the same checks
    [(s, r) for s in STRATEGIES for r in (True, False) if (s, r) != ("era", True)],
    ids=lambda v: v if isinstance(v, str) else ("btr+lar" if v else "drop"),
)
def test_strategy_end_to_end_matches_reference(strategy, recycle_and_rectify):
    model, inputs = build("llava", batch=2)
    config = ERAConfig(
        strategy=strategy,
        layer=1,
        keep_ratio=0.25,
        recycle=recycle_and_rectify,
        rectify=recycle_and_rectify,
        compiler="eager",
        strict=True,
    )
    expected = EagerReference(model, config)(**inputs)
    out, report = compiled_forward(model, inputs, config)
    assert out.logits.shape == expected.logits.shape
    assert (out.logits - expected.logits).abs().max().item() <= 1e-4
    (site,) = report.pruning
    assert site.kept == config.kept(site.visual_tokens)


def test_strategies_choose_differently():
    """Guards the comparison above: on the same prompt the methods keep different tokens."""
    model, inputs = build("llava")
    chosen = {}
    for strategy in STRATEGIES:
        config = ERAConfig(strategy=strategy, layer=1, compiler="eager", strict=True)
        reference = EagerReference(model, config)
        reference(**inputs)
        chosen[strategy] = tuple(reference.last["anchors"][0].tolist())
    assert len(set(chosen.values())) == len(STRATEGIES)


# --------------------------------------------------------------------------- calibration, layer="auto"


def test_entropy_collapse_layer_is_the_largest_early_drop():
    assert entropy_collapse_layer([0.9, 0.88, 0.5, 0.45, 0.1, 0.0, 0.0, 0.0]) == 2  # the late drop is past L/2
    assert entropy_collapse_layer([0.9, 0.4, 0.35, 0.3]) == 1


def test_calibrate_writes_a_profile_and_auto_prunes_at_its_layer(tmp_path):
    model, inputs = build("llava")
    profile = calibrate(model, zoo_samples(model, "llava", 3), model_name="zoo:llava")
    path = write_profile(profile, str(tmp_path / "profile.json"))
    saved = json.loads(path.read_text())
    assert saved["layers"] == 4 and len(saved["entropy"]) == 4 and saved["samples"] == 3
    assert saved["layer"] == entropy_collapse_layer(saved["entropy"])
    assert path.with_suffix(".png").exists()

    saved["layer"] = 1  # whatever the profile names is where pruning happens
    path.write_text(json.dumps(saved))
    out, report = compiled_forward(
        model, inputs, ERAConfig(layer="auto", profile=str(path), compiler="eager", strict=True)
    )
    assert report.pruning[0].layer == 1 and any("profile" in n for n in report.notes)
    out, report = compiled_forward(model, inputs, ERAConfig(layer="auto", compiler="eager", strict=True))
    assert report.pruning[0].layer == 2 and any("without a calibration profile" in n for n in report.notes)


def test_bad_profile_names_the_field(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="ERAConfig.profile"):
        ERAConfig(layer="auto", profile=str(bad))
    with pytest.raises(ValueError, match="ERAConfig.profile: a calibration profile only applies"):
        ERAConfig(layer=2, profile=str(bad))


def test_custom_strategy_plugs_in():
    from era_compile import register_strategy
    from era_compile.algorithms import top_k_ascending

    def widest(inputs, k, options):
        return Selection(anchors=top_k_ascending(inputs.hidden.norm(dim=-1), k))

    register_strategy("test_l2_norm", widest, overwrite=True)
    model, inputs = build("llava")
    config = ERAConfig(strategy="test_l2_norm", layer=1, compiler="eager", strict=True)
    expected = EagerReference(model, config)(**inputs)
    out, report = compiled_forward(model, inputs, config)
    assert report.pruned and (out.logits - expected.logits).abs().max().item() <= 1e-4
