"""LLaVA-NeXT (anyres) with ERA pruning: `python examples/llava_next.py [--model-path DIR --image FILE]`."""

from _common import run

if __name__ == "__main__":
    run(__doc__, "llava-next")
