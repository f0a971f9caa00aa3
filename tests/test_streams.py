"""A stream of requests through one compiled model: a new prompt length or image size makes the
era backend compile no more Dynamo graphs than a plain ``torch.compile`` does, and every
request equals the eager reference. (A pass that reads a size as a Python int specialises the
dynamic graph Dynamo recompiled, so each new length would compile again: this pins that.)"""

from __future__ import annotations

import pytest
import torch
from conftest import build

from era_compile import ERAConfig, make_era_backend, zoo
from era_compile.reference import EagerReference

GREEDY = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
STREAMS = {  # per request: the zoo input options
    "llava, five prompt lengths": ("llava", [dict(suffix=s) for s in (7, 9, 11, 13, 15)]),
    "qwen2-vl, five image sizes": ("qwen2-vl", [dict(grid=g) for g in ((1, 12, 12), (1, 8, 8), (1, 12, 8),
                                                                      (1, 16, 8), (1, 10, 10))]),
}


def _graphs_per_request(model, requests, backend, count) -> list:
    model.compile(backend=backend)
    seen = []
    with torch.no_grad():
        for inputs in requests:
            before = count()
            out = model.generate(**inputs, **GREEDY)
            seen.append((count() - before, out))
    return seen


@pytest.mark.parametrize("stream", list(STREAMS))
def test_a_stream_compiles_what_plain_compile_does(stream):
    name, options = STREAMS[stream]
    model, _ = build(name)
    requests = [zoo.ZOO[name].make_inputs(model, seed=i, **o) for i, o in enumerate(options)]
    config = ERAConfig(layer=2, keep_ratio=0.25, compiler="eager", strict=True)
    expected = [EagerReference(model, config).generate(**r, **GREEDY) for r in requests]
    plain_graphs = []
    plain = _graphs_per_request(model, requests, lambda gm, ex: plain_graphs.append(gm) or gm.forward,
                                lambda: len(plain_graphs))
    torch._dynamo.reset()
    backend = make_era_backend(config)
    era = _graphs_per_request(model, requests, backend, lambda: backend.report.graphs)
    assert [n for n, _ in era] == [n for n, _ in plain]
    assert sum(n for n, _ in era[2:]) <= len(requests) - 2  # after warm-up: at most HF's own, one per image size
    for (_, out), ref in zip(era, expected):
        assert torch.equal(out.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-4
