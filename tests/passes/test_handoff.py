"""handoff: a merge with no decoder after it returns its visual mask beside the merged embeddings."""

from __future__ import annotations

import pytest
import torch

from era_compile.passes.graph_pass import PassError
from era_compile.passes.kinds import GraphKind
from era_compile.passes.records import Handoff, HandoffOutputs, VisualSpan
from toys import IMAGE, PassRecorder, ToyVLM, prompt


def test_the_mask_trails_the_outputs():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt(visual=8)

    def merge_only(ids, features):
        return ids * 2, model.embed(ids).masked_scatter((ids == IMAGE)[..., None], features)

    rec = PassRecorder(merge_only, ids, features)
    assert rec.kind is GraphKind.HANDOFF
    handoff = rec.record(Handoff)
    assert handoff.embeddings_output == 1 and rec.record(VisualSpan).visual_tokens == 8
    outputs = list(rec.result.gm(*rec.inputs()))
    mask = HandoffOutputs.take(outputs, len(handoff.outputs.values())).visual_mask
    assert torch.equal(mask, ids == IMAGE) and len(outputs) == 2


def test_merged_embeddings_that_do_not_leave_the_graph_are_refused():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt()

    def merge_then_project(ids, features):
        return (model.head(model.embed(ids).masked_scatter((ids == IMAGE)[..., None], features)),)

    with pytest.raises(PassError, match="merged embeddings are not an output"):
        PassRecorder(merge_then_project, ids, features)
