"""The vLLM plugin's settings (``additional_config={"era": {...}}``): read as an ERAConfig, every field
it cannot honour refused by name. No vLLM needed: the reader imports none."""

from __future__ import annotations

import pytest

from era_compile import ERAConfig
from era_compile.vllm.config import era_config_from


@pytest.mark.parametrize("additional_config", [{}, {"other_plugin": {"x": 1}}, None])
def test_no_era_section_leaves_the_plugin_inert(additional_config):
    assert era_config_from(additional_config) is None


def test_the_issue_example_is_era_at_k0():
    config = era_config_from({"era": {"keep_ratio": 0.11}})
    assert config == ERAConfig(keep_ratio=0.11, layer=0)
    assert era_config_from({"era": {"keep_tokens": 32, "strategy": "divprune", "layer": 0}}) == ERAConfig(
        keep_tokens=32, strategy="divprune", layer=0
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"keep_ratoi": 0.2}, r"additional_config\['era'\]: unknown field 'keep_ratoi'"),
        ({"layer": 2}, r"\.layer=2: only 0 is supported: .*same slots"),
        ({"layer": "auto"}, r"\.layer='auto': only 0 is supported"),
        ({"compiler": "eager"}, r"\.compiler: not used in vLLM"),
        ({"attention": "sdpa"}, r"\.attention: not used in vLLM"),
        ({"keep_ratio": 1.5}, r"ERAConfig\.keep_ratio: must be a number in \(0, 1\]"),
        ({"strategy": "nope"}, r"ERAConfig\.strategy: unknown strategy 'nope'"),
    ],
)
def test_what_it_cannot_honour_is_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        era_config_from({"era": fields})


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match=r"additional_config\['era'\] must be a mapping of ERAConfig fields, got list"):
        era_config_from({"era": [0.11]})
