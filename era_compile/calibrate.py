"""Calibration for ``layer="auto"``: the Entropy Collapse Layer of a model (ALGORITHMS.md §3.4).

    era-compile calibrate llava --out profile.json                # a zoo model, synthetic images
    era-compile calibrate /models/llava-1.5-7b-hf --images DIR --out profile.json
    ERAConfig(layer="auto", profile="profile.json")

The model runs eagerly on the calibration inputs; a pre-hook on every decoder layer reads the
visual rows of the hidden states entering it. Per layer, the normalised matrix entropy of
those rows is averaged over samples, and K is the layer after the largest drop in the first
half of the model. The profile is JSON (entropy per layer, K, what was measured) with a PNG
plot beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from era_compile.algorithms.entropyprune import entropy_collapse_layer, visual_matrix_entropy
from era_compile.reference import visual_token_ids

RULE = "K = argmin over 1 <= l <= L/2 of H_l - H_(l-1), H_l the mean normalised matrix entropy of the visual rows"


@torch.no_grad()
def layer_entropies(model, samples: Iterable[dict]) -> tuple:
    """(mean entropy per decoder layer input, number of samples) over ``samples`` (model inputs)."""
    layers = model.get_decoder().layers
    ids = torch.tensor(visual_token_ids(model))
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def capture(index):
        def hook(module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    totals, count = [0.0] * len(layers), 0
    try:
        for inputs in samples:
            visual = torch.isin(inputs["input_ids"], ids.to(inputs["input_ids"].device))
            model(**inputs)
            for b in range(visual.shape[0]):
                if int(visual[b].sum()) < 2:
                    continue
                for i, hidden in enumerate(captured):
                    assert hidden is not None  # the forward ran every decoder layer, and its hook
                    totals[i] += visual_matrix_entropy(hidden[b][visual[b]])
                count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("calibrate: no sample held at least two visual tokens")
    return [t / count for t in totals], count


def calibrate(model, samples: Iterable[dict], *, model_name: str = "") -> dict:
    """The profile ``ERAConfig(layer="auto", profile=...)`` reads."""
    entropy, count = layer_entropies(model, samples)
    return {
        "model": model_name,
        "layers": len(entropy),
        "samples": count,
        "entropy": entropy,
        "layer": entropy_collapse_layer(entropy),
        "rule": RULE,
    }


def zoo_samples(model, name: str, count: int):
    """Synthetic calibration inputs for a zoo model: random images, one per seed."""
    from era_compile import zoo

    for seed in range(count):
        yield zoo.ZOO[name].make_inputs(model, seed=seed)


def image_folder_samples(processor, folder: str, question: str, count: int, device):
    """Each image file in ``folder`` (sorted) with ``question``, through the model's processor."""
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise ValueError(f"calibrate: no image files in {folder}")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    for path in files[:count]:
        yield processor(images=Image.open(path).convert("RGB"), text=prompt, return_tensors="pt").to(device)


def write_profile(profile: dict, out: str) -> Path:
    """The JSON profile, and a PNG of entropy per layer beside it (when matplotlib is installed:
    an optional extra; the profile alone is what ``layer="auto"`` reads)."""
    path = Path(out)
    path.write_text(json.dumps(profile, indent=2) + "\n")
    try:
        import matplotlib
    except ImportError:
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(profile["layers"]), profile["entropy"], marker="o")
    ax.axvline(profile["layer"], color="red", linestyle="--", label=f"K = {profile['layer']}")
    ax.set_xlabel("decoder layer (input)")
    ax.set_ylabel("visual matrix entropy")
    ax.set_title(f"{profile['model']}: {profile['samples']} samples", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return path
