"""A generated image-question dataset: coloured shapes on a plain background.

Every item is a deterministic function of ``(seed, split, index)``, so a dataset can be
rebuilt anywhere, items can be read in any order, and train/val never share a stream.
Each question type has exactly four equally likely answers, so chance accuracy is 0.25.
"""
from __future__ import annotations

import math
import random

import torch
from PIL import Image, ImageDraw

from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, Message, Sample

SPLITS = ("train", "val")

# Saturated, well separated colours so a colour is unambiguous even after resizing.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (235, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")

QUESTIONS: dict[str, str] = {
    "color": "What color are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
}
QUESTION_TYPES: tuple[str, ...] = tuple(QUESTIONS)

BACKGROUND = (255, 255, 255)
GRID = 4  # shapes sit in distinct cells of a GRID x GRID layout, so they never overlap
# Shape sizes as fractions of the cell side; the slack leaves a gap so shapes never touch.
MIN_SIZE_FRAC, MAX_SIZE_FRAC = 0.5, 0.9


def answer_vocabulary() -> list[str]:
    """Every answer any question can have."""
    return list(COLORS) + list(SHAPES) + list(COUNT_WORDS)


def corpus() -> list[str]:
    """Every question and answer string (e.g. to train a tokenizer on)."""
    return list(QUESTIONS.values()) + answer_vocabulary()


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _place_boxes(rng: random.Random, count: int, image_size: int) -> list[tuple[int, int, int, int]]:
    """Random non-overlapping square boxes, each inside its own randomly chosen cell of a
    GRID x GRID layout (random size and offset within the cell).

    Keeping every shape whole inside one cell means no shape is cut by a cell border: with
    the default 4x4 grid at 112 px a cell is one 28-px merged image token of a ViT with
    14-px patches and 2x2 merging, which is what lets a tiny model learn shape and count.
    """
    cell = image_size // GRID
    lo = max(3, math.floor(MIN_SIZE_FRAC * cell))
    hi = max(lo, min(math.floor(MAX_SIZE_FRAC * cell), cell - 3))  # >= 1 px margin each side
    lo = min(lo, hi)
    boxes: list[tuple[int, int, int, int]] = []
    for c in rng.sample(range(GRID * GRID), count):
        size = rng.randint(lo, hi)
        x0 = (c % GRID) * cell + rng.randint(1, cell - size - 1)
        y0 = (c // GRID) * cell + rng.randint(1, cell - size - 1)
        boxes.append((x0, y0, x0 + size - 1, y0 + size - 1))
    return boxes


class ShapesDataset(torch.utils.data.Dataset):
    """``num_samples`` single-image questions about colour, shape kind or count of the drawn shapes."""

    def __init__(self, split: str, num_samples: int, image_size: int = 112, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if image_size < 28:
            raise ValueError(f"image_size must be >= 28, got {image_size}")
        self.split = split
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed

    @staticmethod
    def answer_vocabulary() -> list[str]:
        return answer_vocabulary()

    @staticmethod
    def corpus() -> list[str]:
        return corpus()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes
        # (unlike hash()) and gives each (seed, split, index) its own independent stream.
        rng = random.Random(f"shapes/{self.seed}/{self.split}/{index}")
        color = rng.choice(list(COLORS))
        kind = rng.choice(SHAPES)
        count = rng.randint(1, len(COUNT_WORDS))
        question_type = rng.choice(QUESTION_TYPES)

        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for box in _place_boxes(rng, count, self.image_size):
            _draw_shape(draw, kind, box, COLORS[color])

        answer = {"color": color, "shape": kind, "count": COUNT_WORDS[count - 1]}[question_type]
        return Sample(
            messages=[
                Message("user", f"{IMAGE_PLACEHOLDER}\n{QUESTIONS[question_type]}"),
                Message("assistant", answer),
            ],
            images=[image],
            meta={"question_type": question_type, "color": color, "shape": kind, "count": count},
        )
