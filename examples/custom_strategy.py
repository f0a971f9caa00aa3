"""A pruning method of your own, compiled, with BTR recycling and LAR rectification, in a dozen
lines: keep the visual tokens whose hidden states have the largest L2 norm.

    python examples/custom_strategy.py        # on the tiny zoo LLaVA
"""

import torch

from era_compile import ERAConfig, make_era_backend, register_strategy, zoo
from era_compile.algorithms import Selection, top_k_ascending


def largest_norm(inputs, k, options):
    """inputs.hidden [B, T, D]: the visual hidden states entering layer K; return k anchors per sample."""
    return Selection(anchors=top_k_ascending(inputs.hidden.norm(dim=-1), k))


register_strategy("l2_norm", largest_norm)

if __name__ == "__main__":
    model, inputs = zoo.build("llava")
    backend = make_era_backend(ERAConfig(strategy="l2_norm", recycle=True, rectify=True, compiler="eager"))
    model.compile(backend=backend)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    print(f"generated token ids (random weights): {out[0, inputs['input_ids'].shape[1] :].tolist()}")
    print(backend.report)
