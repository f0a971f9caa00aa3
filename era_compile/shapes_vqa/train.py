"""Train the shapes-VQA model from scratch on CPU (or a GPU where there is one).

    python -m era_compile.shapes_vqa.train --out era_compile/shapes_vqa/weights

Each training image comes with its own question and ``--extra-questions`` more about the same
scene, one after the other (``<image> q1 a1 q2 a2 ...``): the image tokens dominate the cost, so
several answers per image teach more per step. The first question sits right after the image,
exactly as in evaluation. Cross-entropy on the answer words alone, AdamW with warm-up and cosine
decay, fresh samples every step (the train split is an endless stream), validation accuracy (one
question per image, as evaluated) every ``--eval-every`` steps.
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
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from era_compile.shapes_vqa import task
from era_compile.shapes_vqa.model import (INIT_STD, build_model, left_padded, pixel_values, position_ids, prompt_ids,
                                          score)
from era_compile.shapes_vqa.tokenizer import WordTokenizer


# The suite re-measures the committed model on the first SLICE test questions.
SLICE = 200


def accuracy(model, tokenizer, split: str, count: int) -> Dict[str, float]:
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
    where = [(i, width - len(row) + position) for i, (row, answers) in enumerate(zip(rows, targets))
             for position, _ in answers]
    labels = [answer for answers in targets for _, answer in answers]
    return inputs, torch.tensor(where), torch.tensor(labels)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    tokenizer = WordTokenizer.for_task()
    model = build_model(tokenizer, seed=args.seed, init_std=args.init_std)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    history = []
    start = time.time()
    running = None
    step = 0
    for step in range(args.steps):
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step)
        chunk = task.samples("train", step * args.batch, args.batch)
        inputs, where, labels = training_batch(chunk, tokenizer, args.extra_questions,
                                               np.random.default_rng([args.seed, step]))
        logits = model(**inputs, position_ids=position_ids(inputs["attention_mask"])).logits
        loss = F.cross_entropy(logits[where[:, 0], where[:, 1]], labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = accuracy(model, tokenizer, "validation", args.val_samples)
            elapsed = time.time() - start
            history.append({"step": step + 1, "loss": running, "validation": val, "seconds": elapsed})
            print(f"step {step + 1:5d}  loss {running:.3f}  validation {val['all']:.3f}  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in val.items() if k != "all") + f"  ({elapsed / 60:.1f} min)",
                  flush=True)
            if elapsed > args.max_minutes * 60:
                print(f"stopping: over --max-minutes {args.max_minutes}", flush=True)
                break
    seconds = time.time() - start
    test = accuracy(model, tokenizer, "test", args.test_samples)
    print(f"test accuracy {test['all']:.4f} on {args.test_samples} questions", flush=True)
    test_slice = accuracy(model, tokenizer, "test", SLICE)["all"]  # what the test suite re-checks

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save(out / "vocab.json")
    import transformers

    record = {
        "command": "python -m era_compile.shapes_vqa.train " + " ".join(sys.argv[1:]),
        "seed": args.seed, "steps": step + 1, "batch": args.batch, "extra_questions": args.extra_questions,
        "lr": args.lr, "init_std": args.init_std, "train_seconds": seconds,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test": test, "test_samples": args.test_samples, f"test_first_{SLICE}": test_slice, "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    p.add_argument("--steps", type=int, default=3400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--extra-questions", type=int, default=8, help="more questions per training image")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init-std", type=float, default=INIT_STD, help="weight init std of the language model")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--val-samples", type=int, default=300)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=56.0, help="stop after the evaluation past this time")
    return p


if __name__ == "__main__":
    train(parser().parse_args())
