"""serve-bench: a seeded stream through generate() on eager, compiled and pruned models; its record
holds every field a serving user reads, and every image request was pruned."""

from __future__ import annotations

import json

import torch

from era_compile.cli import main
from era_compile.serve_bench import MODELS, make_stream


def test_the_traffic_model_streams_images_of_64_to_1024_tokens():
    from era_compile import zoo
    from era_compile.serve_bench import models_of

    torch.manual_seed(0)
    model = zoo.ZOO["qwen2-vl-serve"].make_model()
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        1024,
        8,
        16,
        4,
    )
    stream = make_stream("qwen2-vl-serve", model, requests=16, max_batch=8, seed=0)
    counts = [t for r in stream for t in r.visual_tokens]
    assert min(counts) >= 64 and max(counts) <= 1024 and max(counts) >= 512
    assert models_of("qwen2-vl-serve") == ("compiled", "pruned") and models_of("qwen2-vl") == MODELS


def test_the_stream_is_seeded_and_holds_many_image_sizes():
    from era_compile import zoo

    model, _ = zoo.build("qwen2-vl")
    a, b = (make_stream("qwen2-vl", model, requests=12, max_batch=8, seed=3) for _ in range(2))
    assert [r.visual_tokens for r in a] == [r.visual_tokens for r in b]
    assert len({t for r in a for t in r.visual_tokens}) >= 10  # the bar for a Qwen-class stream
    assert {r.batch for r in a} <= set(range(1, 9)) and max(r.batch for r in a) > 1
    assert any(len(set(r.visual_tokens)) > 1 for r in a)  # ragged batches among them


def test_serve_bench_writes_every_field(tmp_path, capsys):
    code = main(
        [
            "serve-bench",
            "qwen2-vl",
            "--compiler",
            "eager",
            "--requests",
            "3",
            "--max-batch",
            "2",
            "--new-tokens",
            "2",
            "--replays",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "serve-qwen2-vl-cpu.json").read_text())
    assert record["pruned_share"] == 1.0 and record["image_requests"] == 9  # 3 requests, a first pass and 2 replays
    for label in MODELS:
        summary = record["summary"][label]
        for key in (
            "wall_s",
            "replay_wall_s",
            "ttft_p50_s",
            "ttft_p95_s",
            "decode_tokens_per_s",
            "graphs_compiled",
            "compile_seconds",
            "replay_graphs_compiled",
            "peak_kv_cache_bytes",
        ):
            assert summary[key] is not None, (label, key)
        assert summary["replay_graphs_compiled"] == 0  # the replay runs on warm models
        assert len(record["per_request"][label]) == len(record["replay"][label]) == 3
        assert all(r["ttft_s"] <= r["wall_s"] for r in record["per_request"][label] + record["replay"][label])
        # each request's replay row is the lower median of its 2 replays, i.e. the faster one
        for row, runs in zip(record["replay"][label], record["replay_ttft_s"][label], strict=True):
            assert len(runs) == 2 and row["ttft_s"] == min(runs)
    assert record["summary"]["pruned"]["graphs_compiled"] > 0 and record["summary"]["eager"]["graphs_compiled"] == 0
    assert record["summary"]["pruned"]["peak_kv_cache_bytes"] < record["summary"]["compiled"]["peak_kv_cache_bytes"]
    # the ideal of every pruned request: the kept lengths are each sample's real length less its pruned tokens
    for i, ideal in enumerate(record["replay"]["ideal"]):
        layout, visual = record["replay"]["pruned"][i]["layout"], record["visual_tokens"][i]
        assert ideal["ttft_s"] > 0 and max(ideal["kept_lengths"]) == layout["kept_len"] < layout["N"]
        assert len(ideal["kept_lengths"]) == len(visual)
    summary = record["ideal"]
    assert summary["ideal_share"] > 0 and set(summary["prefill_speedup"]) == {"pruned", "ideal"}
    assert (tmp_path / "serve-qwen2-vl-cpu.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| pruned |" in out and "| ideal |" in out and "share of ideal" in out
