"""attention: the SDPA calls of layers >= K become era::biased_attention with the LAR bias."""

from __future__ import annotations

import pytest
import torch

from era_compile import ERAConfig
from era_compile.algorithms.sequence import BLOCKED
from era_compile.ops.prune import without_lar
from era_compile.passes.fx_utils import call_arguments
from era_compile.passes.records import PruneSite, RectifiedAttention
from toys import LAYERS, PassRecorder, ToyVLM, prompt


@pytest.mark.parametrize("layer", [0, 2])
def test_layers_from_k_on_are_rectified(layer):
    torch.manual_seed(0)
    rec = PassRecorder(ToyVLM().eval(), *prompt(), config=ERAConfig(layer=layer, keep_tokens=3), until="attention")
    rectified = rec.record(RectifiedAttention)
    assert rectified.layers == list(range(layer, LAYERS)) and rectified.kernel == "sdpa"
    assert rec.added("era.biased_attention") == LAYERS - layer
    assert rec.added("scaled_dot_product_attention") == -(LAYERS - layer)
    site = rec.record(PruneSite)
    for _, call in rectified.calls:
        args = call_arguments(call)
        assert args["bias"] is site.log_bias and args["kernel"] == "sdpa"
        assert args["causal"] is True and args["attn_mask"] is None  # the toy attends causally


def test_rectify_off_still_blocks_the_empty_slots():
    """rectify=False drops LAR's log b but keeps the blocking of empty slots: the same calls are
    rewritten, with the bias 0 at every kept token and BLOCKED where the kept sequence holds none."""
    torch.manual_seed(0)
    rec = PassRecorder(
        ToyVLM().eval(), *prompt(), config=ERAConfig(layer=1, keep_tokens=3, rectify=False), until="attention"
    )
    rectified = rec.record(RectifiedAttention)
    assert rectified.layers == list(range(1, LAYERS)) and not rectified.lar
    site = rec.record(PruneSite)
    (bias,) = {call_arguments(call)["bias"] for _, call in rectified.calls}
    assert bias.target is without_lar and bias.args == (site.log_bias,)
    log_bias = torch.tensor([[0.7, 0.0, BLOCKED]])  # an anchor, a text token, an empty slot
    assert torch.equal(without_lar(log_bias), torch.tensor([[0.0, 0.0, BLOCKED]]))
