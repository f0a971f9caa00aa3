"""era-compile explain / bench / fidelity on the tiny zoo model; FLOP counting; bad MODEL."""

from __future__ import annotations

import json

import pytest

from conftest import build
from era_compile import ERAConfig
from era_compile.bench import language_model_flops
from era_compile.cli import main
from era_compile.fidelity import GROUPS, QUERY_SETS


def test_explain_prints_what_was_rewritten(capsys, tmp_path):
    assert main(["explain", "llava", "--layer", "1", "--dump", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pruned at the input of layer 1: 36 -> 9 visual tokens" in out
    assert "layer  0: full sequence (48), SDPA unchanged" in out
    assert "layer  3: 21 tokens, era::biased_attention (sdpa)" in out
    assert list(tmp_path.glob("*/compiled.py"))


def test_explain_gives_each_graphs_kind_and_pass_times(capsys):
    assert main(["explain", "llava", "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill graph; passes (ms): normalize" in out and "prune " in out and "dce " in out
    assert "text graph; passes (ms)" in out


def test_dynamo_warnings_are_held_back_until_asked_for(capsys):
    """transformers' own graph breaks are warnings a user cannot act on: during a command they are
    held back from Dynamo's log handler (the report comes first) and shown after it on request;
    Dynamo's errors go through."""
    import logging

    from era_compile.cli import _HeldBack

    dynamo = logging.getLogger("torch._dynamo.variables.tensor")
    with _HeldBack() as held:
        assert held.handlers, "Dynamo's log handler was not found: nothing would be held back"
        dynamo.warning("Graph break from `Tensor.item()`")
        dynamo.error("a real Dynamo error")
    assert [r.getMessage() for r in held.records] == ["Graph break from `Tensor.item()`"]
    assert all(held not in h.filters for h in held.handlers)  # the handlers are as they were
    held.show(everything=False)
    assert "1 Dynamo warning(s) held back" in capsys.readouterr().err
    held.show(everything=True)
    assert "Graph break from `Tensor.item()`" in capsys.readouterr().err


def test_bench_writes_its_record_and_plots(tmp_path, capsys):
    code = main(
        [
            "bench",
            "llava",
            "--compiler",
            "eager",
            "--layers",
            "1",
            "--keep",
            "9",
            "18",
            "--runs",
            "2",
            "--new-tokens",
            "3",
            "--batch",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "llava-batch3-cpu.json").read_text())
    assert record["model"] == "llava" and record["runs"] == 2 and "CPU" in record["device"]
    assert record["batch"] == 3 and len(set(record["prompt_lengths"])) == 3  # left-padded, all lengths differ
    assert [p["kept"] for p in record["points"]] == [9, 18]
    for p in record["points"]:
        for key in (
            "measured_prefill_speedup",
            "theoretical_prefill_speedup",
            "prefill_speedup_vs_theory",
            "selection_overhead",
            "lm_prefill_flops",
            "kv_cache",
            "times",
            "ideal_prefill_speedup",
            "measured_vs_ideal",
        ):
            assert key in p
        # the ideal: the compiled unpruned model on each sample's kept length, plus the vision tower
        assert p["ideal"]["kept_lengths"] == [n - 36 + p["kept"] for n in record["prompt_lengths"]]
        ideal, share = p["ideal"], 1 / 4  # K = 1 of 4 layers runs on the whole prompt
        assert ideal["prefill_s"] == pytest.approx(
            ideal["vision_s"] + share * ideal["text_prefill_full_s"] + (1 - share) * ideal["text_prefill_s"]
        )
        # the pruned prefill timed in the ideal's rounds is the one the share is of
        assert p["measured_vs_ideal"] == pytest.approx(ideal["prefill_s"] / ideal["pruned_prefill_s"])
        assert p["compile"]["seconds"] > 0 and {"span", "prune", "attention"} <= set(p["compile"]["pass_ms"])
        for moment, t in (("after_prefill", 0), ("after_3_new_tokens", 2)):
            kv = p["kv_cache"][moment]
            assert kv["cached_positions"] == record["prompt_tokens"] + t
            assert kv["stored_rows_per_layer"] == [record["prompt_tokens"] + t] + [p["seq_len_after"] + t] * 3
            assert kv["unpruned"] - kv["pruned"] == kv["saved"]
            # the gap is what a CompactKV stores beside its rows: 12 bytes (a position and a bias) per
            # row and tensor, against 128 bytes per row of this tiny model's keys (2 heads x 16)
            assert 0.8 < kv["share_of_theory"] <= 1.0
        assert set(p["times"]) == {"eager", "compiled", "pruned"}
        assert p["lm_prefill_flops"]["pruned"] < p["lm_prefill_flops"]["unpruned"]
        assert 0 < p["selection_overhead"]["fraction"] < 1
        assert p["linear_gflops"]["before"] > 0 and p["linear_gflops"]["after"] > 0
    assert (tmp_path / "llava-batch3-cpu-latency.png").stat().st_size > 0
    assert (tmp_path / "llava-batch3-cpu-speedup.png").stat().st_size > 0


def test_bench_batch_needs_a_paddable_model():
    from era_compile.loading import ModelLoadError, load

    with pytest.raises(ModelLoadError, match="--batch 2: zoo model 'qwen2-vl'"):
        load("qwen2-vl", batch=2)


def test_fidelity_shares_sum_to_one(tmp_path, capsys):
    assert main(["fidelity", "llava", "--layer", "1", "--new-tokens", "4", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "fidelity-llava.json").read_text())
    assert set(record["settings"]) == {"unpruned", "prune", "prune+recycle", "era"}
    assert record["settings"]["unpruned"]["kl_next_token"] == pytest.approx(0.0, abs=1e-9)
    assert record["settings"]["unpruned"]["top1_agreement"] == 1.0
    for result in record["settings"].values():
        assert len(result["attention_mass"]) == 4  # every decoder layer
        for by_query in result["attention_mass"].values():
            assert set(by_query) == set(QUERY_SETS)
            for shares in by_query.values():
                assert set(shares) == set(GROUPS) and sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    era, pruned = record["settings"]["era"], record["settings"]["prune"]
    # LAR gives the anchors back the vision share pruning took (the collapse the ERA paper draws)
    assert era["attention_mass"]["3"]["last"]["vision"] > pruned["attention_mass"]["3"]["last"]["vision"]
    assert (tmp_path / "fidelity-llava-attention.png").exists()


@pytest.mark.parametrize("command", ["explain", "bench", "fidelity"])
def test_a_path_that_is_not_a_vlm_is_refused(command, tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4})
    )
    assert main([command, str(tmp_path)]) == 2
    assert "is a LlamaConfig, not a vision-language model" in capsys.readouterr().err
    assert main([command, str(tmp_path / "missing")]) == 2
    assert "neither a zoo model" in capsys.readouterr().err


def _analytic_lm_flops(model, n_per_layer, n_out):
    """Matmul FLOPs of a Llama decoder (projections, MLP, QK^T and PV) and the LM head."""
    c = model.config.text_config
    D, ffn, Hq, Hkv, V = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size
    d = D // Hq

    def layer(n):
        return 2 * n * D * (Hq + 2 * Hkv) * d + 2 * n * Hq * d * D + 3 * 2 * n * D * ffn + 4 * Hq * n * n * d

    return sum(layer(n) for n in n_per_layer) + 2 * n_out * D * V


def test_flop_count_matches_the_analytic_formula():
    """Pruning with no selection work of its own (random anchors, no recycling): the counted
    language-model FLOPs equal the per-layer formula; unpruned too."""
    model, inputs = build("llava")
    N, T, L = inputs["input_ids"].shape[1], 36, 4
    assert language_model_flops(model, inputs, None) == pytest.approx(_analytic_lm_flops(model, [N] * L, N), rel=0.01)
    config = ERAConfig(layer=2, keep_tokens=9, strategy="random", recycle=False)
    n = N - T + 9
    counted = language_model_flops(model, inputs, config)
    assert counted == pytest.approx(_analytic_lm_flops(model, [N, N, n, n], n), rel=0.01)
    # ERA's own selection and recycling add their matmuls on top (about 2% on this tiny model)
    assert language_model_flops(model, inputs, config.replace(strategy="era", recycle=True)) > counted


def test_layer0_selection_cost_counts_the_projections_the_cut_at_0_adds():
    from era_compile import zoo
    from era_compile.bench import layer0_selection_cost

    model, inputs = zoo.build("llava", batch=2)  # 5 text tokens, 36 visual, 7 text after the image
    cost = layer0_selection_cost(model, inputs, {"prefill_s": 1.0}, repeats=1)
    attention = model.get_decoder().layers[0].self_attn
    q, k = attention.q_proj.weight.numel(), attention.k_proj.weight.numel()
    positions = inputs["input_ids"].numel()
    assert cost["positions"] == positions == 2 * 48 and cost["instruction_rows"] == 2 * 7
    assert cost["flops"] == 2 * positions * (q + k)
    assert cost["rows_read_flops"] == 2 * (2 * 7 * q + positions * k)
    assert 0 < cost["rows_read_seconds"] and cost["share_of_ideal_prefill"] == cost["seconds"]
