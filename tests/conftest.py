"""Shared helpers: tiny zoo models, compile-and-run, a clean Dynamo state per test."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

from era_compile import ERAConfig, last_report, make_era_backend, zoo  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_forward(model, inputs, config: ERAConfig):
    """Compile ``model`` with the era backend of ``config``, run once; (outputs, report)."""
    backend = make_era_backend(config)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs)
    return out, backend.report


def build(name="llava", **kwargs):
    return zoo.build(name, **kwargs)


__all__ = ["compiled_forward", "build", "last_report"]
