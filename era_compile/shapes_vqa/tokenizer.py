"""A word-level tokenizer for shapes-VQA: every word the task uses, and the image placeholder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from era_compile.shapes_vqa import task

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<bos>", "<eos>", "<image>", "<unk>"
SPECIALS = (PAD, BOS, EOS, IMAGE, UNK)


def task_words() -> list[str]:
    """Every word a question or answer can hold, in a fixed order."""
    words = "what color is the shape at only object how many objects are there which further left , or ?".split()
    words += [w for place in task.PLACES for w in place.split()]
    words += list(task.COLOURS) + list(task.SHAPES) + list(task.COUNT_WORDS)
    return list(dict.fromkeys(words))  # de-duplicated, order kept


class WordTokenizer:
    """Splits on spaces; ids are positions in ``vocab``. Unknown words map to ``<unk>``."""

    def __init__(self, vocab: Sequence[str]):
        if list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocab must start with the special tokens {SPECIALS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab holds a word twice")
        self.vocab = list(vocab)
        self.ids: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.image_id, self.unk_id = (self.ids[s] for s in SPECIALS)

    @classmethod
    def for_task(cls) -> WordTokenizer:
        return cls(list(SPECIALS) + task_words())

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls(json.loads(Path(path).read_text())["vocab"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab}, indent=1) + "\n")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)
