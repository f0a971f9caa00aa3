"""Qwen2.5-VL (or Qwen2-VL) with ERA pruning: `python examples/qwen2_5_vl.py [--model-path DIR --image FILE]`."""

from _common import run

if __name__ == "__main__":
    run(__doc__, "qwen2.5-vl")
