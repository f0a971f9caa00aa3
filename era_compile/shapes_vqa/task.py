"""The shapes-VQA task: coloured shapes on a 3 x 3 grid, questions answered by one or two small regions.

Every sample is drawn from its own generator, seeded by ``(split seed, index)``, so a split is
an infinite, deterministic stream and any sample can be rebuilt alone. The question is chosen
first and the scene is built to fit it (a count question gets 0 to 3 objects of its colour,
"the only red object" gets exactly one red object), which keeps the answers balanced.

    image 96 x 96 RGB (uint8), 3 x 3 cells of 32 px, 3 to 5 objects, one per cell;
    object: circle / square / triangle, 14 to 20 px, one of 5 colours, anywhere inside its cell;
    background: a plain grey, or grey with pixel noise.

Question kinds (one answer word each):

    colour_at   what color is the shape at the top left ?             -> red
    shape_of    what shape is the only blue object ?                  -> triangle
    count       how many green objects are there ?                    -> two
    left_of     which is further left , the red circle or the blue square ?  -> blue

With 8 px patches an image is 144 visual tokens; an object covers 4 to 9 of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID
MIN_SIZE, MAX_SIZE = 14, 20
MIN_OBJECTS, MAX_OBJECTS = 3, 5

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
# cell (row, column) -> its name in a question, row-major
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three")
KINDS = ("colour_at", "shape_of", "count", "left_of")
MAX_QUESTION_WORDS = 13  # "which is further left , the red circle or the blue square ?"
# Background grey levels and noise: far from every object colour, so a pixel's class is never in doubt.
BACKGROUND_LEVELS = (96, 176)
NOISE_STD = 12.0

SPLIT_SEEDS = {"train": 1000, "validation": 2000, "test": 3000}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cell: int  # 0..8, row-major
    size: int
    x0: int  # top-left corner of the bounding box, in pixels
    y0: int

    @property
    def centre_x(self) -> float:
        return self.x0 + (self.size - 1) / 2


@dataclass
class Sample:
    image: np.ndarray  # [96, 96, 3] uint8
    question: str
    answer: str
    kind: str
    shapes: list[Shape] = field(default_factory=list)


def sample(split: str, index: int) -> Sample:
    """Sample ``index`` of ``split`` ("train", "validation" or "test"): the same every time."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    kind = KINDS[rng.integers(len(KINDS))]
    shapes, question, answer = _BUILDERS[kind](rng)
    return Sample(image=render(shapes, rng), question=question, answer=answer, kind=kind, shapes=shapes)


def samples(split: str, start: int, count: int) -> list[Sample]:
    return [sample(split, i) for i in range(start, start + count)]


# --------------------------------------------------------------------------- scenes fitted to a question


def _scene(rng: np.random.Generator, specs: list[tuple[str, str]], cells: list[int]) -> list[Shape]:
    """Shapes of the given (colour, kind) in the given cells, each at a random size and place in its cell."""
    shapes = []
    for (colour, kind), cell in zip(specs, cells, strict=True):
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        row, col = divmod(cell, GRID)
        slack = CELL - size - 2  # a 1 px margin on each side: shapes never touch across cells
        shapes.append(
            Shape(
                colour,
                kind,
                cell,
                size,
                col * CELL + 1 + int(rng.integers(slack + 1)),
                row * CELL + 1 + int(rng.integers(slack + 1)),
            )
        )
    return shapes


def _count_objects(rng) -> int:
    return int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))


def _pick(rng, options, avoid=()):
    options = [o for o in options if o not in avoid]
    return options[rng.integers(len(options))]


def _fill(rng, specs: list[tuple[str, str]], total: int, avoid_colours=()) -> list[tuple[str, str]]:
    """Add random objects (not of ``avoid_colours``) until there are ``total``."""
    while len(specs) < total:
        specs.append((_pick(rng, list(COLOURS), avoid_colours), _pick(rng, SHAPES)))
    return specs


def _cells(rng, n: int) -> list[int]:
    return [int(c) for c in rng.permutation(GRID * GRID)[:n]]


def _colour_at(rng):
    n = _count_objects(rng)
    specs = _fill(rng, [], n)
    cells = _cells(rng, n)
    shapes = _scene(rng, specs, cells)
    target = shapes[rng.integers(n)]
    return shapes, f"what color is the shape at the {PLACES[target.cell]} ?", target.colour


def _shape_of(rng):
    n = _count_objects(rng)
    colour = _pick(rng, list(COLOURS))
    kind = _pick(rng, SHAPES)
    specs = _fill(rng, [(colour, kind)], n, avoid_colours=(colour,))
    order = rng.permutation(n)
    shapes = _scene(rng, [specs[i] for i in order], _cells(rng, n))
    return shapes, f"what shape is the only {colour} object ?", kind


def _count(rng):
    n = _count_objects(rng)
    colour = _pick(rng, list(COLOURS))
    count = int(rng.integers(len(COUNT_WORDS)))  # 0..3 <= MIN_OBJECTS
    specs = _fill(rng, [(colour, _pick(rng, SHAPES)) for _ in range(count)], n, avoid_colours=(colour,))
    order = rng.permutation(n)
    shapes = _scene(rng, [specs[i] for i in order], _cells(rng, n))
    return shapes, f"how many {colour} objects are there ?", COUNT_WORDS[count]


def _left_of(rng):
    n = _count_objects(rng)
    first, second = rng.choice(len(COLOURS), size=2, replace=False)
    colours = [list(COLOURS)[first], list(COLOURS)[second]]
    kinds = [_pick(rng, SHAPES), _pick(rng, SHAPES)]
    # the two named objects sit in different columns: "further left" never hinges on a few pixels
    columns = rng.choice(GRID, size=2, replace=False)
    rows = rng.integers(GRID, size=2)
    named = [int(r * GRID + c) for r, c in zip(rows, columns, strict=True)]
    others = [c for c in _cells(rng, GRID * GRID) if c not in named][: n - 2]
    specs = _fill(rng, [(colours[0], kinds[0]), (colours[1], kinds[1])], n, avoid_colours=colours)
    shapes = _scene(rng, specs, named + others)
    answer = colours[0] if columns[0] < columns[1] else colours[1]
    question = f"which is further left , the {colours[0]} {kinds[0]} or the {colours[1]} {kinds[1]} ?"
    return shapes, question, answer


_BUILDERS = {"colour_at": _colour_at, "shape_of": _shape_of, "count": _count, "left_of": _left_of}


def questions_about(shapes: list[Shape]) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) the scene answers, by kind: training asks several per image."""
    per_colour = {c: [s for s in shapes if s.colour == c] for c in COLOURS}
    unique = [s for s in shapes if len(per_colour[s.colour]) == 1]
    found: dict[str, list[tuple[str, str]]] = {
        "colour_at": [(f"what color is the shape at the {PLACES[s.cell]} ?", s.colour) for s in shapes],
        "shape_of": [(f"what shape is the only {s.colour} object ?", s.kind) for s in unique],
        "count": [
            (f"how many {c} objects are there ?", COUNT_WORDS[len(group)])
            for c, group in per_colour.items()
            if len(group) < len(COUNT_WORDS)
        ],
        "left_of": [],
    }
    for a in unique:
        for b in unique:
            if a.cell % GRID != b.cell % GRID:  # different columns
                found["left_of"].append(
                    (
                        f"which is further left , the {a.colour} {a.kind} or the {b.colour} {b.kind} ?",
                        a.colour if a.cell % GRID < b.cell % GRID else b.colour,
                    )
                )
    return found


# --------------------------------------------------------------------------- drawing


def shape_mask(kind: str, size: int) -> np.ndarray:
    """bool [size, size]: the pixels a shape covers inside its bounding box."""
    centre = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "circle":
        return (x - centre) ** 2 + (y - centre) ** 2 <= (size / 2) ** 2
    if kind == "square":
        margin = round(size * 0.12)  # a square of the circle's area, roughly: both read as "one object"
        return (x >= margin) & (x < size - margin) & (y >= margin) & (y < size - margin)
    if kind == "triangle":  # apex up, base on the bottom row
        return np.abs(x - centre) <= (y + 1) / 2
    raise ValueError(f"unknown shape {kind!r}")


def render(shapes: list[Shape], rng: np.random.Generator) -> np.ndarray:
    level = int(rng.integers(BACKGROUND_LEVELS[0], BACKGROUND_LEVELS[1] + 1))
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), float(level))
    if rng.random() < 0.5:  # a noisy background
        image += rng.normal(0.0, NOISE_STD, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for s in shapes:
        box = image[s.y0 : s.y0 + s.size, s.x0 : s.x0 + s.size]
        box[shape_mask(s.kind, s.size)] = COLOURS[s.colour]
    return image
