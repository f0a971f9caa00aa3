"""Train the shapes-VQA model from scratch on CPU (or a GPU where there is one).

    python -m era_compile.shapes_vqa.train --out era_compile/shapes_vqa/weights

Two stages. Stage 1 trains the vision tower and projector alone on dense labels the generator
knows for free (per visual token: the object whose centre it holds, the object it covers, its
cell), through linear heads on the projected tokens; stage 2 trains everything on the answers,
those labels still beside them. The heads are dropped after training: the saved model is a plain
``LlavaForConditionalGeneration``. Answers alone left a ViT this small at chance on shapes.

In stage 2 each image comes with its own question and ``--extra-questions`` more about the same
scene, one after the other (``<image> q1 a1 q2 a2 ...``): the image tokens dominate the cost, so
several answers per image teach more per step. The first question sits right after the image,
exactly as in evaluation. Cross-entropy on the answer words, AdamW with warm-up and cosine decay,
fresh samples every step (the train split is an endless stream), validation accuracy (one
question per image, as evaluated) every ``--eval-every`` steps, when a checkpoint is also written
(``--resume`` continues a stopped run, step for step as if it had not stopped).
Writes ``model.safetensors`` + ``config.json`` (``save_pretrained``), ``vocab.json``, and
``training.json``: the command, seed, steps, wall time, versions and the accuracies reached.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from era_compile.shapes_vqa import task
from era_compile.shapes_vqa.model import (
    INIT_STD,
    NUM_VISUAL,
    PATCH,
    PATCH_GRID,
    build_model,
    left_padded,
    pixel_values,
    position_ids,
    prompt_ids,
    score,
)
from era_compile.shapes_vqa.tokenizer import WordTokenizer

# Stage 1 draws its images from here on in the train split, apart from stage 2's.
VISION_SAMPLES = 10_000_000
# The suite re-measures the committed model on the first SLICE test questions.
SLICE = 200


def accuracy(model, tokenizer, split: str, count: int) -> dict[str, float]:
    """Accuracy overall and per question kind on the first ``count`` samples of ``split``."""
    model.eval()
    return score(model, task.samples(split, 0, count), tokenizer)


def training_batch(samples, tokenizer: WordTokenizer, extra: int, rng: np.random.Generator):
    """Inputs with each sample's question then ``extra`` more about its scene (a kind drawn
    uniformly among those the scene answers, then a question of it), left-padded; and the
    (row, position) of every question's last word with the answer id to predict there."""
    rows, targets = [], []
    for s in samples:
        found = {kind: pairs for kind, pairs in task.questions_about(s.shapes).items() if pairs}
        kinds = sorted(found)
        asked = [(s.question, s.answer)]
        for _ in range(extra):
            pairs = found[kinds[rng.integers(len(kinds))]]
            asked.append(pairs[rng.integers(len(pairs))])
        ids = prompt_ids(asked[0][0], tokenizer)
        answers = []
        for i, (question, answer) in enumerate(asked):
            if i:
                ids += tokenizer.encode(question)
            answers.append((len(ids) - 1, tokenizer.ids[answer]))
            ids.append(tokenizer.ids[answer])
        rows.append(ids)
        targets.append(answers)
    width = max(len(r) for r in rows)
    inputs = left_padded(rows, width, tokenizer.pad_id)
    inputs["pixel_values"] = pixel_values([s.image for s in samples])
    where = [
        (i, width - len(row) + position)
        for i, (row, answers) in enumerate(zip(rows, targets, strict=True))
        for position, _ in answers
    ]
    labels = [answer for answers in targets for _, answer in answers]
    return inputs, torch.tensor(where), torch.tensor(labels)


def patch_targets(samples):
    """Two [B, NUM_VISUAL] label maps over the visual tokens, 0 for none, else 1 + the
    (colour, shape) class of an object: ``centre``, the patch holding the object's bounding-box
    centre (one per object: what a count reads); ``cover``, every patch the object covers by at
    least an eighth (what a question about a place reads). Cells are whole patches, so objects never
    share one."""
    centre = torch.zeros(len(samples), NUM_VISUAL, dtype=torch.long)
    cover = torch.zeros(len(samples), NUM_VISUAL, dtype=torch.long)
    colours = list(task.COLOURS)
    for i, s in enumerate(samples):
        for shape in s.shapes:
            label = 1 + colours.index(shape.colour) * len(task.SHAPES) + task.SHAPES.index(shape.kind)
            middle = (shape.size - 1) / 2
            row, col = int((shape.y0 + middle) // PATCH), int((shape.x0 + middle) // PATCH)
            centre[i, row * PATCH_GRID + col] = label
            pixels = np.zeros((task.IMAGE_SIZE, task.IMAGE_SIZE), dtype=np.int64)
            pixels[shape.y0 : shape.y0 + shape.size, shape.x0 : shape.x0 + shape.size] = task.shape_mask(
                shape.kind, shape.size
            )
            per_patch = torch.from_numpy(pixels.reshape(PATCH_GRID, PATCH, PATCH_GRID, PATCH).sum((1, 3)).reshape(-1))
            cover[i][per_patch >= PATCH * PATCH // 8] = label
    return centre, cover


def cell_targets() -> torch.Tensor:
    """[NUM_VISUAL] the 3 x 3 cell each patch lies in."""
    rows, cols = torch.meshgrid(torch.arange(PATCH_GRID), torch.arange(PATCH_GRID), indexing="ij")
    per_cell = task.CELL // PATCH
    return ((rows // per_cell) * task.GRID + cols // per_cell).reshape(-1)


class PatchHeads(torch.nn.Module):
    """Linear probes on the projected visual tokens (what the language model reads), trained beside
    the answers and dropped after training: which object's centre a token holds, which object it
    covers, which cell it lies in. Answers alone teach the vision tower slowly (a ViT this small
    from scratch sat at chance on shapes for thousands of steps); these dense labels give it every
    object on every image."""

    cells: torch.Tensor  # a buffer: each patch's cell

    def __init__(self, width: int):
        super().__init__()
        classes = 1 + len(task.COLOURS) * len(task.SHAPES)
        self.centre = torch.nn.Linear(width, classes)
        self.cover = torch.nn.Linear(width, classes)
        self.cell = torch.nn.Linear(width, task.GRID * task.GRID)
        self.register_buffer("cells", cell_targets(), persistent=False)

    def losses(self, visual: torch.Tensor, samples) -> dict[str, torch.Tensor]:
        visual = visual.reshape(len(samples), NUM_VISUAL, -1)
        centre, cover = patch_targets(samples)
        return {
            "centre": F.cross_entropy(self.centre(visual).flatten(0, 1), centre.flatten()),
            "cover": F.cross_entropy(self.cover(visual).flatten(0, 1), cover.flatten()),
            "cell": F.cross_entropy(self.cell(visual).flatten(0, 1), self.cells.repeat(len(samples))),
        }


def schedule(peak: float, warmup: int, steps: int):
    """Linear warm-up, then cosine decay to 5% of ``peak``."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def optimise(optimiser, lr: float, loss: torch.Tensor) -> None:
    for group in optimiser.param_groups:
        group["lr"] = lr
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimiser.param_groups for p in group["params"]], 1.0)
    optimiser.step()


def train(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    tokenizer = WordTokenizer.for_task()
    model = build_model(tokenizer, seed=args.seed, init_std=args.init_std)
    heads = PatchHeads(model.config.text_config.hidden_size)
    seen: dict[str, torch.Tensor] = {}  # the projector's output: the visual tokens as the language model gets them
    model.model.multi_modal_projector.register_forward_hook(lambda module, inputs, output: seen.update(visual=output))
    vision = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    vision_optimiser = torch.optim.AdamW(
        vision + list(heads.parameters()), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    optimiser = torch.optim.AdamW(
        list(model.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    state: dict[str, Any] = {"vision_step": 0, "step": 0, "history": [], "seconds": 0.0, "running": None}
    if args.resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        vision_optimiser.load_state_dict(saved["vision_optimiser"])
        optimiser.load_state_dict(saved["optimiser"])
        state = saved["state"]
        print(f"resumed from {checkpoint_path}: vision step {state['vision_step']}, step {state['step']}", flush=True)

    def save_checkpoint() -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "heads": heads.state_dict(),
                "state": state,
                "vision_optimiser": vision_optimiser.state_dict(),
                "optimiser": optimiser.state_dict(),
            },
            checkpoint_path,
        )

    started = time.time() - state["seconds"]
    model.train()
    # Stage 1: the vision tower and projector alone on the dense labels (no language model: twice the
    # images per step at about 40% of a stage-2 step's time here).
    vision_lr = schedule(args.lr, args.warmup, args.vision_steps)
    for step in range(state["vision_step"], args.vision_steps):
        chunk = task.samples("train", VISION_SAMPLES + step * args.vision_batch, args.vision_batch)
        model.model.get_image_features(pixel_values=pixel_values([s.image for s in chunk]))
        losses = heads.losses(seen["visual"], chunk)
        total = cast(torch.Tensor, sum(losses.values()))  # a sum of tensors (never the empty sum's 0)
        optimise(vision_optimiser, vision_lr(step), total)
        state["vision_step"] = step + 1
        if (step + 1) % args.eval_every == 0 or step + 1 == args.vision_steps:
            state["seconds"] = time.time() - started
            print(
                f"vision step {step + 1:5d}  "
                + "  ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                + f"  ({state['seconds'] / 60:.1f} min)",
                flush=True,
            )
            save_checkpoint()

    # Stage 2: everything, on the answers, the dense labels still beside them.
    lr_at = schedule(args.lr, args.warmup, args.steps)
    for step in range(state["step"], args.steps):
        model.train()
        chunk = task.samples("train", step * args.batch, args.batch)
        inputs, where, labels = training_batch(
            chunk, tokenizer, args.extra_questions, np.random.default_rng([args.seed, step])
        )
        logits = model(**inputs, position_ids=position_ids(inputs["attention_mask"])).logits
        answer_loss = F.cross_entropy(logits[where[:, 0], where[:, 1]], labels)
        dense = sum(heads.losses(seen["visual"], chunk).values())
        optimise(optimiser, lr_at(step), answer_loss + args.patch_loss * dense)
        state["step"] = step + 1
        state["running"] = (
            answer_loss.item() if state["running"] is None else 0.98 * state["running"] + 0.02 * answer_loss.item()
        )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = accuracy(model, tokenizer, "validation", args.val_samples)
            state["seconds"] = time.time() - started
            state["history"].append(
                {"step": step + 1, "loss": state["running"], "validation": val, "seconds": state["seconds"]}
            )
            print(
                f"step {step + 1:5d}  loss {state['running']:.3f}  validation {val['all']:.3f}  "
                + "  ".join(f"{k} {v:.2f}" for k, v in val.items() if k != "all")
                + f"  ({state['seconds'] / 60:.1f} min)",
                flush=True,
            )
            save_checkpoint()
            if state["seconds"] > args.max_minutes * 60:
                print(f"stopping: over --max-minutes {args.max_minutes}", flush=True)
                break
    seconds = time.time() - started
    test = accuracy(model, tokenizer, "test", args.test_samples)
    print(f"test accuracy {test['all']:.4f} on {args.test_samples} questions", flush=True)
    test_slice = accuracy(model, tokenizer, "test", SLICE)["all"]  # what the test suite re-checks

    model.save_pretrained(out)
    tokenizer.save(out / "vocab.json")
    import transformers

    record = {
        "command": "python -m era_compile.shapes_vqa.train " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "vision_steps": state["vision_step"],
        "vision_batch": args.vision_batch,
        "steps": state["step"],
        "batch": args.batch,
        "extra_questions": args.extra_questions,
        "lr": args.lr,
        "init_std": args.init_std,
        "patch_loss": args.patch_loss,
        "train_seconds": seconds,
        "machine": (
            f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads"
        ),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test": test,
        "test_samples": args.test_samples,
        f"test_first_{SLICE}": test_slice,
        "history": state["history"],
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if state["step"] == args.steps:  # finished; a run stopped by --max-minutes can still be resumed
        checkpoint_path.unlink()
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--extra-questions", type=int, default=8, help="more questions per training image")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init-std", type=float, default=INIT_STD, help="weight init std of the language model")
    p.add_argument("--vision-steps", type=int, default=800, help="steps of stage 1 (vision tower on dense labels)")
    p.add_argument("--vision-batch", type=int, default=64)
    p.add_argument("--patch-loss", type=float, default=1.0, help="weight of the dense labels in stage 2")
    p.add_argument(
        "--resume", action="store_true", help="continue from --out/checkpoint.pt (written every --eval-every steps)"
    )
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-samples", type=int, default=300)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=45.0, help="stop after the evaluation past this time")
    return p


if __name__ == "__main__":
    train(parser().parse_args())
