"""shapes-VQA: the generator is deterministic and right (checked from the pixels alone), the
committed model keeps its recorded accuracy, and ``eval`` runs through the compiled backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from era_compile.shapes_vqa import task
from era_compile.shapes_vqa.tokenizer import WordTokenizer


def test_samples_are_deterministic_per_split_and_index():
    a, b = task.sample("train", 17), task.sample("train", 17)
    assert np.array_equal(a.image, b.image) and (a.question, a.answer) == (b.question, b.answer)
    others = [task.sample(split, 17) for split in ("validation", "test")] + [task.sample("train", 18)]
    assert all(not np.array_equal(a.image, o.image) for o in others)
    assert a.image.shape == (96, 96, 3) and a.image.dtype == np.uint8


def test_bad_split_and_index_are_named():
    with pytest.raises(ValueError, match="split"):
        task.sample("dev", 0)
    with pytest.raises(ValueError, match="index"):
        task.sample("test", -1)


# --------------------------------------------------------------------------- an independent answer, from pixels


def _colour_pixels(image: np.ndarray, colour: str) -> np.ndarray:
    """bool [H, W]: pixels of exactly this palette colour (the background, grey plus noise, never is)."""
    return np.all(image == np.array(task.COLOURS[colour], dtype=np.uint8), axis=-1)


def _cell_colour(image: np.ndarray, cell: int):
    row, col = divmod(cell, task.GRID)
    patch = image[row * task.CELL : (row + 1) * task.CELL, col * task.CELL : (col + 1) * task.CELL]
    found = [c for c in task.COLOURS if _colour_pixels(patch, c).any()]
    assert len(found) <= 1, "a cell holds one object at most"
    return found[0] if found else None


def _shape_from_pixels(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"


def answer_from_pixels(image: np.ndarray, question: str) -> str:
    words = question.split()
    cells = [_cell_colour(image, c) for c in range(task.GRID * task.GRID)]
    if question.startswith("what color"):
        place = " ".join(words[words.index("the", 4) + 1 : -1])
        return cells[task.PLACES.index(place)]
    if question.startswith("how many"):
        return task.COUNT_WORDS[sum(c == words[2] for c in cells)]
    if question.startswith("what shape"):
        return _shape_from_pixels(_colour_pixels(image, words[5]))
    if question.startswith("which is further left"):
        first, second = words[6], words[10]
        centre = {c: np.nonzero(_colour_pixels(image, c))[1].mean() for c in (first, second)}
        return first if centre[first] < centre[second] else second
    raise AssertionError(f"unknown question {question!r}")


def test_answers_agree_with_the_pixels():
    samples = task.samples("test", 0, 400)
    for s in samples:
        assert answer_from_pixels(s.image, s.question) == s.answer, (s.question, s.answer)
    by_kind = {k: [s.answer for s in samples if s.kind == k] for k in task.KINDS}
    assert all(len(v) > 60 for v in by_kind.values())  # every kind is drawn
    assert set(by_kind["count"]) == set(task.COUNT_WORDS)  # counts 0..3 all occur
    assert set(by_kind["shape_of"]) == set(task.SHAPES)
    assert set(by_kind["colour_at"]) == set(task.COLOURS)


def test_tokenizer_covers_every_question_and_answer():
    tok = WordTokenizer.for_task()
    for s in task.samples("validation", 0, 200):
        ids = tok.encode(s.question + " " + s.answer)
        assert tok.unk_id not in ids and tok.decode(ids) == s.question + " " + s.answer
        assert len(s.question.split()) <= task.MAX_QUESTION_WORDS
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer(["a", "b"])


# --------------------------------------------------------------------------- training


def test_dense_training_labels_agree_with_the_pixels():
    from era_compile.shapes_vqa.model import PATCH
    from era_compile.shapes_vqa.model import PATCH_GRID as grid
    from era_compile.shapes_vqa.train import patch_targets

    samples = task.samples("train", 0, 60)
    centre, cover = patch_targets(samples)
    for s, centres, covers in zip(samples, centre, cover, strict=True):
        assert (centres > 0).sum() == len(s.shapes)
        for patch in range(grid * grid):
            row, col = divmod(patch, grid)
            pixels = s.image[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]
            most = max(task.COLOURS, key=lambda c: _colour_pixels(pixels, c).sum())
            covered = _colour_pixels(pixels, most).sum() >= PATCH * PATCH // 8
            assert (covers[patch] > 0) == covered, (patch, s.shapes)
            for label in {int(covers[patch]), int(centres[patch])} - {0}:
                colour, shape = divmod(label - 1, len(task.SHAPES))
                assert list(task.COLOURS)[colour] == most
                # the shape, from the whole object's pixels in its cell
                cell = (row // (task.CELL // PATCH)) * task.GRID + col // (task.CELL // PATCH)
                r, c = divmod(cell, task.GRID)
                region = s.image[r * task.CELL : (r + 1) * task.CELL, c * task.CELL : (c + 1) * task.CELL]
                assert task.SHAPES[shape] == _shape_from_pixels(_colour_pixels(region, most))


def test_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A run stopped by --max-minutes and resumed runs only the steps left, and ends with the
    weights of one that ran through."""
    from safetensors.torch import load_file

    from era_compile.shapes_vqa import train as training
    from era_compile.shapes_vqa.train import parser, train

    tiny = [
        "--batch",
        "2",
        "--vision-batch",
        "2",
        "--vision-steps",
        "2",
        "--steps",
        "4",
        "--warmup",
        "2",
        "--eval-every",
        "2",
        "--val-samples",
        "4",
        "--test-samples",
        "4",
        "--extra-questions",
        "1",
    ]
    train(parser().parse_args(tiny + ["--out", str(tmp_path / "through")]))
    stopped = train(parser().parse_args(tiny + ["--out", str(tmp_path / "resumed"), "--max-minutes", "0"]))
    assert stopped["steps"] == 2 and (tmp_path / "resumed" / "checkpoint.pt").is_file()
    original, batches = training.training_batch, []

    def counted(*args):
        batches.append(args)
        return original(*args)

    monkeypatch.setattr(training, "training_batch", counted)
    resumed = train(parser().parse_args(tiny + ["--out", str(tmp_path / "resumed"), "--resume"]))
    assert len(batches) == 2 and resumed["steps"] == 4 and not (tmp_path / "resumed" / "checkpoint.pt").exists()
    through = load_file(tmp_path / "through" / "model.safetensors")
    after = load_file(tmp_path / "resumed" / "model.safetensors")
    assert through.keys() == after.keys()
    for name in through:
        assert torch.equal(through[name], after[name]), name


# --------------------------------------------------------------------------- the committed model and eval


@pytest.fixture(scope="module")
def trained():
    from era_compile.shapes_vqa.model import load_model

    return load_model()


def test_committed_model_keeps_its_recorded_accuracy(trained):
    import json

    from era_compile.shapes_vqa.model import WEIGHTS
    from era_compile.shapes_vqa.train import SLICE, accuracy

    model, tokenizer = trained
    record = json.loads((WEIGHTS / "training.json").read_text())
    measured = accuracy(model, tokenizer, "test", SLICE)["all"]
    assert abs(measured - record[f"test_first_{SLICE}"]) <= 0.01
    assert record["test"]["all"] >= 0.9 and record["test_samples"] >= 1000  # the bar, unpruned


def test_eval_runs_through_the_backend_and_matches_the_eager_reference(trained, tmp_path, capsys):
    import json

    from era_compile import ERAConfig
    from era_compile.cli import main
    from era_compile.reference import EagerReference
    from era_compile.shapes_vqa.model import score

    code = main(
        [
            "eval",
            "shapes-vqa",
            "--questions",
            "40",
            "--strategies",
            "era",
            "fastv",
            "--settings",
            "prune",
            "era",
            "--ratios",
            "0.25",
            "0.11",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "eval-shapes-vqa-k2.json").read_text())
    assert [(r["strategy"], r["setting"], r["kept"]) for r in record["results"]] == [
        (strategy, setting, kept) for strategy in ("era", "fastv") for setting in ("prune", "era") for kept in (36, 16)
    ]
    assert (tmp_path / "eval-shapes-vqa-k2.png").stat().st_size > 0
    assert "| era / era |" in capsys.readouterr().out
    # one compile per (strategy, setting): the second ratio ran through the same graphs (run_eval
    # raises if a ratio compiles anything), as many as a one-ratio run compiles
    assert [(c["strategy"], c["setting"]) for c in record["compiles"]] == [
        ("era", "prune"),
        ("era", "era"),
        ("fastv", "prune"),
        ("fastv", "era"),
    ]
    assert all(c["graphs"] == record["compiles"][0]["graphs"] for c in record["compiles"])
    # the compiled accuracy is the eager reference's, same algorithm, same questions, at the budget
    # the run switched to without compiling
    model, tokenizer = trained
    config = ERAConfig(layer=2, keep_ratio=None, keep_tokens=16, strategy="era", recycle=True, rectify=True)
    expected = score(EagerReference(model, config), task.samples("test", 0, 40), tokenizer)
    assert record["results"][3]["accuracy"] == expected


def test_every_question_a_scene_answers_agrees_with_the_pixels():
    asked = 0
    for s in task.samples("train", 0, 100):
        found = task.questions_about(s.shapes)
        assert (s.question, s.answer) in found[s.kind]  # the sample's own question is among them
        for pairs in found.values():
            for question, answer in pairs:
                assert answer_from_pixels(s.image, question) == answer, question
                asked += 1
    assert asked > 1000
