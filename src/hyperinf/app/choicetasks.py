"""Multiple-choice tasks built from the shipped BBC News articles, as rows of the ``multiple-choice`` format.

- ``bbc-title-mc`` (like QASC): an article's opening sentences, title removed -> which of four titles
  is its own; the three distractors are titles of other articles **of the same topic**, so the
  topic alone does not answer it.
- ``bbc-next-mc`` (like HellaSwag): an article's first sentences -> which of four sentences comes
  next; the distractors are sentences of other articles of the same topic.

Each row is ``{"question", "choices", "answer", "topic", "article"}`` (``answer`` the index of the
correct choice), so a user's own multiple-choice file runs the same way. Built seeded; the correct
choice's position is spread evenly over the four (each position within one of a quarter of the
rows). ``variant="noisy"`` replaces the answer key of ``noise`` of the rows with a distractor's
index and marks them in ``key_replaced``: the mislabeled candidates of a selection pool.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from hyperinf.app.textdata import bbc_articles
from hyperinf.errors import ConfigurationError

OPTIONS = 4
CONTEXT_SENTENCES = 2
VARIANTS = ("clean", "noisy")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(body: str) -> list[str]:
    """The sentences of an article's body (its paragraphs joined), each of at least four words."""
    text = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.split()) >= 4]


def _parsed() -> list[dict[str, Any]]:
    """Each distinct article as its topic, title and sentences (articles repeated in the corpus kept once)."""
    seen: set[str] = set()
    parsed = []
    for index, (topic, article) in enumerate(bbc_articles()):
        lines = [line.strip() for line in article.splitlines() if line.strip()]
        if len(lines) < 2 or lines[1] in seen:
            continue
        seen.add(lines[1])
        parsed.append(
            {"article": index, "topic": topic, "title": lines[0], "sentences": sentences("\n".join(lines[1:]))}
        )
    return parsed


def _rows(
    make: Callable[[dict[str, Any], list[dict[str, Any]], random.Random], tuple[str, str, list[str]] | None], seed: int
) -> list[dict[str, Any]]:
    """One row per article ``make`` can use: its question, the correct choice among distractors of the same
    topic, at a position spread evenly over the rows."""
    rng = random.Random(seed)
    articles = _parsed()
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for article in articles:
        by_topic.setdefault(article["topic"], []).append(article)
    made = []
    for article in articles:
        others = [a for a in by_topic[article["topic"]] if a is not article]
        found = make(article, others, rng)
        if found is not None:
            made.append((article, *found))
    positions = [i % OPTIONS for i in range(len(made))]
    rng.shuffle(positions)
    rows = []
    for (article, question, correct, distractors), position in zip(made, positions):
        choices = distractors[:position] + [correct] + distractors[position:]
        rows.append(
            {
                "question": question,
                "choices": choices,
                "answer": position,
                "topic": article["topic"],
                "article": article["article"],
            }
        )
    return rows


def _distinct(candidates: list[str], exclude: str, rng: random.Random) -> list[str] | None:
    """``OPTIONS - 1`` distinct candidates other than ``exclude``, drawn with ``rng``; None if too few."""
    pool = sorted(set(candidates) - {exclude})
    return rng.sample(pool, OPTIONS - 1) if len(pool) >= OPTIONS - 1 else None


def _title_question(article: dict[str, Any], others: list[dict[str, Any]], rng: random.Random) -> Any:
    if len(article["sentences"]) < CONTEXT_SENTENCES:
        return None
    distractors = _distinct([a["title"] for a in others], article["title"], rng)
    opening = " ".join(article["sentences"][:CONTEXT_SENTENCES])
    return (
        None if distractors is None else (f"{opening}\nWhich is this story's headline?", article["title"], distractors)
    )


def _next_question(article: dict[str, Any], others: list[dict[str, Any]], rng: random.Random) -> Any:
    if len(article["sentences"]) <= CONTEXT_SENTENCES:
        return None
    correct = article["sentences"][CONTEXT_SENTENCES]
    pool = [s for a in rng.sample(others, min(len(others), 12)) for s in a["sentences"][CONTEXT_SENTENCES:]]
    distractors = _distinct(pool, correct, rng)
    context = " ".join(article["sentences"][:CONTEXT_SENTENCES])
    return None if distractors is None else (f"{context}\nWhat comes next?", correct, distractors)


TASKS: dict[str, Callable[[dict[str, Any], list[dict[str, Any]], random.Random], Any]] = {
    "bbc-title-mc": _title_question,
    "bbc-next-mc": _next_question,
}


def choice_rows(task: str, *, seed: int = 0, variant: str = "clean", noise: float = 0.2) -> list[dict[str, Any]]:
    """The rows of a built-in multiple-choice task (:data:`TASKS`), the noisy variant's keys replaced."""
    if task not in TASKS:
        raise ConfigurationError(f"unknown multiple-choice task {task!r}: use one of {', '.join(TASKS)}")
    if variant not in VARIANTS:
        raise ConfigurationError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    rows = _rows(TASKS[task], seed)
    for row in rows:
        row["key_replaced"] = False
    if variant == "noisy":
        rng = random.Random(seed + 1)
        for i in rng.sample(range(len(rows)), round(noise * len(rows))):
            wrong = [k for k in range(OPTIONS) if k != rows[i]["answer"]]
            rows[i] |= {"answer": rng.choice(wrong), "key_replaced": True}
    return rows
