"""Each example script runs end to end on its zoo model (no checkpoint path) and prunes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["llava.py", "llava_next.py", "qwen2_5_vl.py", "llava_onevision.py"])
def test_example_runs_on_its_zoo_model(script):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--compiler", "eager", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pruned at layer 2" in done.stdout and "generated token ids" in done.stdout


def test_custom_strategy_example_runs_compiled():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_strategy.py")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pruned at layer 2" in done.stdout and "over a cache" in done.stdout
