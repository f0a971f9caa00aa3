"""LLaVA-OneVision on a video with ERA pruning (all frames' tokens are one selection pool):
`python examples/llava_onevision.py [--model-path DIR --frames F1.jpg F2.jpg ...]`."""

from _common import run

if __name__ == "__main__":
    run(__doc__, "llava-onevision", media="video")
