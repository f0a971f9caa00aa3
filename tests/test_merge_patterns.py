"""Image merges the passes find by their pattern, not by a model's name: LLaVA made to merge its
image features another way runs the whole check of a supported registry type (strict forward
against the reference, the independent oracle, batch 2, generate)."""

from __future__ import annotations

import pytest
import torch
from test_registry import check_supported
from transformers.models.llava.modeling_llava import LlavaModel

from era_compile import registry


class WhereMergeLlavaModel(LlavaModel):
    """Features at full length, ``features[slot]``, chosen row by row with ``torch.where``:
    the visual-token count is in no shape. ``inverted``: the condition is True at the text;
    ``split``: a graph break after the merge, so the decoder's graph receives the merged embeddings
    (the merge's graph hands its visual mask on)."""

    inverted = False
    split = False

    def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        if pixel_values is not None:
            embeds = self.get_input_embeddings()(input_ids)
            image = self.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
            features = torch.cat(list(image), dim=0).reshape(-1, embeds.shape[-1])
            is_image = input_ids == self.config.image_token_id
            slot = (is_image.flatten().long().cumsum(0) - 1).clamp(min=0).view_as(input_ids)  # each position's row
            if self.inverted:
                inputs_embeds = torch.where(~is_image.unsqueeze(-1), embeds, features[slot])
            else:
                inputs_embeds = torch.where(is_image.unsqueeze(-1), features[slot], embeds)
            input_ids = None
            if self.split:
                torch._dynamo.graph_break()
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


class SplitInvertedWhereMergeLlavaModel(WhereMergeLlavaModel):
    """Both variations at once (each run of the whole check costs the suite half a minute; the
    polarity alone is also pinned on a toy in ``tests/passes/test_kinds.py``)."""

    inverted = True
    split = True


@pytest.mark.parametrize("merge", [WhereMergeLlavaModel, SplitInvertedWhereMergeLlavaModel])
def test_a_where_merge_prunes_like_masked_scatter(merge):
    model, inputs = registry.build("llava")
    with torch.no_grad():
        plain = model(**inputs).logits
    model.model.__class__ = merge
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)  # the same model, merged another way
    measured = check_supported(model, inputs)
    assert measured["oracle"] <= 1e-6 and measured["forward"] <= 1e-6, measured
