"""publish: the prefill's PrefillOutputs trail the model's outputs, and the runtime takes them back."""

from __future__ import annotations

import torch

from era_compile.passes.records import PrefillOutputs, PruneSite
from toys import PassRecorder, ToyVLM, prompt


def _outputs(gm):
    return list(gm.graph.output_node().args[0])


def test_without_a_mask_every_key_is_visible():
    torch.manual_seed(0)
    ids, features = prompt()
    rec = PassRecorder(ToyVLM().eval(), ids, features)
    published, site = rec.record(PrefillOutputs), rec.record(PruneSite)
    assert published.values()[:2] == (site.keep_index, site.log_bias)
    assert len(_outputs(rec.result.gm)) == len(_outputs(rec.gm)) + 4
    outputs = list(rec.result.gm(*rec.inputs()))
    published = PrefillOutputs.take(outputs, 4)
    assert published.key_visible.shape == ids.shape and bool(published.key_visible.all())  # N: the caches' length
    assert published.samples.tolist() == [[8, rec.config.kept(8)]]  # what the report records per call


def test_with_a_mask_the_last_querys_visibility_is_appended_and_the_runtime_reads_it_back():
    torch.manual_seed(0)
    ids, features = prompt()
    N = ids.shape[1]
    mask = torch.ones(1, 1, N, N, dtype=torch.bool).tril()
    rec = PassRecorder(ToyVLM().eval(), ids, features, None, mask)
    outputs = list(rec.result.gm(*rec.inputs()))
    count = len(rec.record(PrefillOutputs).values())
    assert count == 4
    published = PrefillOutputs.take(outputs, count)  # what the runtime does
    assert published.keep_index.dtype == torch.int64 and published.log_bias.dtype == torch.float32
    assert published.key_visible.shape == (1, N) and bool(published.key_visible.all())
    assert len(outputs) == len(_outputs(rec.gm))
