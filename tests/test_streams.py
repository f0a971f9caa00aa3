"""A stream of requests through one compiled model, as a server sees it: new prompt lengths and
new image sizes. The number of visual tokens, the budget and the pruned length are data of the
pruning ops, so after a warm-up of at most 2 pruned prefill compiles (Dynamo's first, static
graph, then the dynamic one it recompiles to) a new image size compiles no prefill at all; the
backend compiles no more Dynamo graphs than a plain ``torch.compile`` does; every request with
an image is pruned (the report counts each pruned prefill call) and equals the eager reference.

What a plain compile still compiles per new image size is the model's own: Qwen2-VL's
``get_placeholder_mask`` formats the features' size into its error message (an f-string
evaluated even when the check passes), so Dynamo specialises that small graph on it."""

from __future__ import annotations

import pytest
import torch

from conftest import build
from era_compile import ERAConfig, make_era_backend, zoo
from era_compile.reference import EagerReference

GREEDY = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
STREAMS = {  # per request the zoo input options; how many distinct visual-token counts they make
    "llava, five prompt lengths": ("llava", [dict(suffix=s) for s in (7, 9, 11, 13, 15)], 1),
    "qwen2-vl, six image sizes in eight requests": (
        "qwen2-vl",
        [
            dict(grid=g)
            for g in ((1, 12, 12), (1, 8, 8), (1, 12, 8), (1, 16, 8), (1, 10, 10), (1, 8, 12), (1, 12, 12), (1, 14, 10))
        ],
        6,
    ),
    # five crops each (the base view and a 2 x 2 grid): a new crop count is a new size of the model's
    # own pixel_values, which Dynamo recompiles once for (plain compile too), then serves dynamically
    "llava-next, five aspect ratios in six requests": (
        "llava-next",
        [dict(image_size=s) for s in ((40, 60), (60, 40), (64, 64), (36, 64), (64, 36), (50, 64))],
        5,
    ),
}
PRUNED_KINDS = ("prefill", "carried")  # the graphs the passes prune (report.passes' kinds)


def _stream(model, requests, backend, count) -> list:
    """Per request: (Dynamo graphs it compiled, its generate() output)."""
    model.compile(backend=backend)
    seen = []
    with torch.no_grad():
        for inputs in requests:
            before = count()
            out = model.generate(**inputs, **GREEDY)
            seen.append((count() - before, out))
    return seen


def _pruned_compiles(report) -> int:
    return sum(1 for entry in report.passes if entry["kind"] in PRUNED_KINDS)


@pytest.mark.parametrize("stream", list(STREAMS))
def test_a_stream_compiles_no_prefill_after_warm_up(stream):
    name, options, distinct = STREAMS[stream]
    model, _ = build(name)
    requests = [zoo.ZOO[name].make_inputs(model, seed=i, **o) for i, o in enumerate(options)]
    counts = {int((r["input_ids"] == zoo.IMAGE_TOKEN_ID).sum()) for r in requests}
    assert len(counts) == distinct, counts
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    expected = [EagerReference(model, config).generate(**r, **GREEDY) for r in requests]
    plain_graphs = []
    plain = _stream(model, requests, lambda gm, ex: plain_graphs.append(gm) or gm.forward, lambda: len(plain_graphs))
    torch._dynamo.reset()
    backend = make_era_backend(config)
    pruned_after = []

    def count():
        pruned_after.append(_pruned_compiles(backend.report))
        return backend.report.graphs

    era = _stream(model, requests, backend, count)
    # Dynamo graphs: never more than plain compile's (fewer where the pruned outputs, marked dynamic,
    # spare the graph after the decoder its static first compile)
    assert all(e <= p for (e, _), (p, _) in zip(era, plain, strict=True)), ([n for n, _ in era], [n for n, _ in plain])
    per_request = [b - a for a, b in zip(pruned_after[::2], pruned_after[1::2], strict=True)]
    assert sum(per_request) <= 2 and not any(per_request[2:]), per_request  # warm-up, then nothing
    assert backend.report.pruned_calls == len(requests)  # every request's prefill pruned
    assert {p.visual_tokens for p in backend.report.pruning} == counts
    for (_, out), ref in zip(era, expected, strict=True):
        assert torch.equal(out.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) <= 1e-4
