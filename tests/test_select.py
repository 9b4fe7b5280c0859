"""`hyperinf select` and `hyperinf experiment select` end to end on tiny models and ~60 synthetic examples."""

import json
import random
from typing import Any

import pytest
import torch
from references import pairwise_auc
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("peft")
pd = pytest.importorskip("pandas")

from hyperinf.app.finetune import load_trainable  # noqa: E402
from hyperinf.app.select import SelectArgs, load_pool_split, make_learner, run_select  # noqa: E402
from hyperinf.cli import main  # noqa: E402
from hyperinf.errors import ConfigurationError, DataError  # noqa: E402
from hyperinf.paper.analysis.select_noise import noise_aucs  # noqa: E402
from hyperinf.paper.select_study import StudyArgs, run_study  # noqa: E402

GOOD = ["great", "lovely", "happy", "wonderful", "superb"]
BAD = ["awful", "sad", "terrible", "boring", "poor"]
FILLER = ["the", "film", "day", "was", "really", "quite", "today", "my", "trip", "food", "very", "so"]


def synthetic_frame(n: int = 60, seed: int = 0) -> "pd.DataFrame":
    """Short texts whose label is the sentiment word they hold; lengths vary from 3 to 12 words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = rng.choices(FILLER, k=rng.randint(2, 11)) + [rng.choice(GOOD if label == "positive" else BAD)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pool.csv"
    synthetic_frame().to_csv(path, index=False)
    return path


def select_args(data_file, tmp_path, **changes):
    settings = dict(
        task=str(data_file),
        n_pool=40,
        n_target=10,
        model="tiny-bert",
        rank=2,
        epochs=1,
        lr=5e-3,
        batch_size=8,
        max_length=32,
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache" / "adapters",
        progress=False,
    )
    settings.update(changes)
    return SelectArgs(**settings)


def test_select_writes_the_k_most_helpful_rows_and_reuses_its_caches(data_file, tmp_path):
    args = select_args(data_file, tmp_path, balance=False)
    run_select(args)
    frame = pd.read_parquet(args.out / "scores.parquet")
    assert list(frame.columns) == ["row_id", "text", "label", "score", "rank", "token_length"]
    assert len(frame) == 40 and sorted(frame["rank"]) == list(range(40))
    source = synthetic_frame()
    assert all(source.loc[row.row_id, "text"] == row.text for row in frame.itertuples())  # row ids point into the file
    for fraction, label in ((0.05, "5pct"), (0.2, "20pct"), (0.4, "40pct")):
        rows = [json.loads(line) for line in (args.out / f"selected_{label}.jsonl").read_text().splitlines()]
        k = round(fraction * 40)
        assert [r["row_id"] for r in rows] == frame.sort_values(["score", "row_id"])["row_id"].tolist()[:k]
        assert all(set(r) == {"row_id", "text", "label", "score", "rank"} for r in rows)
    datasets = pytest.importorskip("datasets")  # the README's way to train on a selection
    selected = datasets.load_dataset("json", data_files=str(args.out / "selected_20pct.jsonl"), split="train")
    assert selected.num_rows == 8 and set(selected.column_names) >= {"text", "label"}
    arguments = json.loads((args.out / "arguments.json").read_text())
    assert arguments["warm_up"]["cached"] is False and "negative = helpful" in arguments["sign"]
    made = arguments["selections"]["40pct"]
    assert sum(made["labels"].values()) == 16 == sum(made["tokens"]["histogram"].values())
    scores_before = frame["score"].to_numpy()

    run_select(args)  # the second run trains nothing and scores nothing: both come from the caches
    again = json.loads((args.out / "arguments.json").read_text())
    assert again["warm_up"]["cached"] is True
    assert (pd.read_parquet(args.out / "scores.parquet")["score"].to_numpy() == scores_before).all()


def test_normalize_equals_the_cosine_computed_by_hand(data_file, tmp_path):
    """-cos(v, g_k) from a loop of single-example backward calls, v the mean target gradient (TracIn: h = v)."""
    args = select_args(data_file, tmp_path, method="tracin", normalize=True, dtype="float64", fractions=(0.2,))
    run_select(args)
    scores = torch.tensor(pd.read_parquet(args.out / "scores.parquet")["score"].to_numpy())

    from hyperinf.app.select import load_pool_split

    split = load_pool_split(args)
    learner = make_learner(args, split.pool.label_names)
    warm = next(args.cache_dir.glob("*.safetensors"))
    load_trainable(learner.model, load_file(str(warm)))
    params = [
        p for n, p in learner.model.named_parameters() if "lora_" in n
    ]  # blocks="lora": the head is trained, not attributed

    def gradient(pair):
        loss = learner.loss(learner.model, learner.collate([pair])).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    v = torch.stack([gradient(p) for p in split.pairs("target")]).mean(0)
    expected = torch.stack([-torch.dot(v, g) / (v.norm() * g.norm()) for g in map(gradient, split.pairs("pool"))])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)  # the model runs in float32
    assert scores.abs().max() <= 1.0


def test_target_loss_by_label_equals_a_loop_of_single_examples(data_file, tmp_path, capsys):
    """arguments.json's per-label target loss under the warm-up, against one forward per target example."""
    args = select_args(data_file, tmp_path, method="tracin", fractions=(0.2,))
    run_select(args)
    written = json.loads((args.out / "arguments.json").read_text())["target_loss_by_label"]

    from safetensors.torch import load_file

    from hyperinf.app.select import load_pool_split

    split = load_pool_split(args)
    learner = make_learner(args, split.pool.label_names)
    load_trainable(learner.model, load_file(str(next(args.cache_dir.glob("*.safetensors")))))
    with torch.no_grad():
        losses = torch.stack(
            [learner.loss(learner.model, learner.collate([pair])).sum() for pair in split.pairs("target")]
        ).double()
    for i, name in enumerate(split.target.label_names):
        mine = split.target.labels == i
        assert written[name]["n"] == int(mine.sum())
        assert written[name]["mean_loss"] == pytest.approx(float(losses[mine].mean()), rel=1e-5)
        assert written[name]["loss_share"] == pytest.approx(float(losses[mine].sum() / losses.sum()), rel=1e-5)
    assert "target loss by label" in capsys.readouterr().out


def test_labelled_rows_keep_the_pools_label_shares_by_default(data_file, tmp_path, capsys):
    """Without --balance / --no-balance a labelled pool is selected per label (each label its most helpful rows),
    as with --balance; --no-balance ranks the whole pool."""
    args = select_args(data_file, tmp_path, fractions=(0.2,))
    run_select(args)
    assert "each label's share of the pool (the default" in capsys.readouterr().out
    written = json.loads((args.out / "arguments.json").read_text())
    assert written["balanced"] and written["selections"]["20pct"]["labels"] == {"negative": 4, "positive": 4}
    frame = pd.read_parquet(args.out / "scores.parquet").sort_values(["score", "row_id"])
    kept = [json.loads(line)["row_id"] for line in (args.out / "selected_20pct.jsonl").read_text().splitlines()]
    expected = {i for label in ("negative", "positive") for i in frame[frame.label == label]["row_id"][:4]}
    assert set(kept) == expected  # 20 of each label in the pool: each keeps its 4 most helpful
    explicit = select_args(data_file, tmp_path, fractions=(0.2,), balance=True, out=tmp_path / "explicit")
    run_select(explicit)
    assert (explicit.out / "selected_20pct.jsonl").read_text() == (args.out / "selected_20pct.jsonl").read_text()
    plain = select_args(data_file, tmp_path, fractions=(0.2,), balance=False, out=tmp_path / "plain")
    run_select(plain)
    kept = [json.loads(line)["row_id"] for line in (plain.out / "selected_20pct.jsonl").read_text().splitlines()]
    assert kept == frame["row_id"].tolist()[:8]


@pytest.mark.parametrize(
    "options, message",
    [
        ("--fraction 0.2,1.5", ["--fraction", "(0, 1]"]),
        ("--fraction 0.02", ["of label", "< 1 example", "--fraction", "--no-balance"]),
        ("--fraction 0.01 --no-balance", ["of the pool (40 examples)", "< 1 example", "--fraction"]),
        ("--target {tmp}/target.csv", ["labels the pool lacks", "'neutral'"]),
        ("--task {tmp}/one.csv", ["single class", "--label-column"]),
        ("--text-column body", ["no text column 'body'", "--text-column"]),
        ("--task {tmp}/empty.csv", ["is empty"]),
    ],
    ids=[
        "fraction above 1",
        "fewer than one per label",
        "fewer than one",
        "unknown target label",
        "single class",
        "missing column",
        "empty pool",
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(data_file, tmp_path, capsys, options, message):
    pd.DataFrame({"text": ["a b", "c d"], "label": ["neutral", "positive"]}).to_csv(
        tmp_path / "target.csv", index=False
    )
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["pos"] * 3}).to_csv(tmp_path / "one.csv", index=False)
    (tmp_path / "empty.csv").write_text("")
    out = tmp_path / "out"
    argv = f"select --task {data_file} --model tiny-bert --n-pool 40 --n-target 10 --out {out} --cache-dir {tmp_path}/cache --no-progress "
    status = main((argv + options.format(tmp=tmp_path)).split())
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    for fragment in message:
        assert fragment in err
    assert ("--no-balance" in err) == ("--no-balance" in message)  # the hint only where balancing is the cause
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_experiment_select_runs_the_protocol_and_a_second_run_trains_nothing(data_file, tmp_path):
    args = StudyArgs(
        **{k: v for k, v in vars(select_args(data_file, tmp_path)).items() if k not in ("n_pool", "n_target", "out")},
        n_pool=30,
        n_target=10,
        n_test=16,
        variant="noisy",
        methods=("hyperinf", "tracin"),
        continue_epochs=1,
        random_draws=2,
        out=tmp_path / "study",
    )
    run_study(args)
    rows = pd.read_csv(args.out / "results.csv")
    selectors = {"hyperinf", "tracin", "hyperinf cos", "less", "training loss", "RDS+", "hyperinf per-target"}
    for selector in selectors | {"random"}:
        assert sorted(rows[rows.selector == selector]["fraction"].unique()) == [0.05, 0.2, 0.4] or selector == "random"
    assert len(rows[rows.selector == "random"]) == 2 * 3
    assert set(rows.selector) == selectors | {"random", "full pool", "warm-up only"}
    assert rows["accuracy"].between(0, 1).all() and rows.loc[rows.fraction == 0.4, "size"].eq(12).all()
    assert rows.loc[rows.selector == "full pool", "flipped_kept"].item() == pytest.approx(0.2)  # the pool's own share
    assert (args.out / "selection.png").stat().st_size > 0
    record = json.loads((args.out / "arguments.json").read_text())["seeds"][0]
    shares = record["target_loss_by_label"]
    assert (
        sum(v["loss_share"] for v in shares.values()) == pytest.approx(1.0)
        and sum(v["n"] for v in shares.values()) == 10
    )
    from hyperinf.app.select import load_pool_split

    test_labels = load_pool_split(args, n_test=16, flip_fraction=0.2).test.labels
    weights = torch.bincount(test_labels, minlength=2).double() / test_labels.numel()
    overall = rows["accuracy_negative"] * float(weights[0]) + rows["accuracy_positive"] * float(weights[1])
    assert (overall - rows["accuracy"]).abs().max() < 1e-12  # per-label accuracies add up to the overall one
    summary = pd.read_csv(args.out / "summary.csv")
    random_20 = summary[(summary.selector == "random") & (summary.fraction == 0.2)]["accuracy"].item()
    assert random_20 == pytest.approx(rows[(rows.selector == "random") & (rows.fraction == 0.2)]["accuracy"].mean())

    run_study(args)
    again = pd.read_csv(args.out / "results.csv")
    assert again["trained_seconds"].fillna(0).eq(0).all()  # every continuation came from the cache
    assert (again["accuracy"] == rows["accuracy"]).all()

    # select_noise: each ranking's ROC-AUC for the flipped labels, against a count of pairs of the cached scores
    clean, noisy = (load_pool_split(args, n_test=16, flip_fraction=f).pool for f in (0.0, 0.2))
    assert clean.texts == noisy.texts
    flipped = clean.labels != noisy.labels
    aucs = noise_aucs(args.out)[0]
    assert set(aucs) == selectors - {"hyperinf per-target"} and all(0 <= a <= 1 for a in aucs.values())
    scored = load_file(str(next((args.cache_dir.parent / "scores").glob("*.safetensors"))))
    for name, column in [("hyperinf", "score/hyperinf"), ("tracin", "score/tracin"), ("training loss", "train_loss")]:
        assert aucs[name] == pytest.approx(pairwise_auc(scored[column], flipped))
    record = json.loads((args.out / "arguments.json").read_text())
    record["args"]["variant"] = "clean"
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "arguments.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="clean run: no label or answer key was replaced"):
        noise_aucs(tmp_path / "clean")


def test_balanced_study_draws_random_per_label(data_file, tmp_path):
    """Under --balance the random baseline has the selections' label make-up, not a free draw's."""
    args = StudyArgs(
        **{
            k: v
            for k, v in vars(select_args(data_file, tmp_path, balance=True)).items()
            if k not in ("n_pool", "n_target", "out", "fractions")
        },
        n_pool=30,
        n_target=10,
        n_test=10,
        fractions=(0.4,),
        methods=("tracin",),
        continue_epochs=1,
        random_draws=3,
        out=tmp_path / "study",
    )
    run_study(args)
    rows = pd.read_csv(args.out / "results.csv")
    from hyperinf.app.select import load_pool_split

    counts = torch.bincount(load_pool_split(args, n_test=10).pool.labels, minlength=2).tolist()
    kept = [round(0.4 * c) for c in counts]
    for _, row in rows[rows.selector.isin(["random", "tracin"])].iterrows():
        assert row["size"] == sum(kept)
        assert [row["share_negative"], row["share_positive"]] == pytest.approx([k / sum(kept) for k in kept])


@pytest.mark.parametrize("dense", [False, True], ids=["lora", "dense last block"])
def test_select_on_a_tiny_causal_lm(data_file, tmp_path, dense):
    """The causal-LM path: answer-only loss, LoRA on q/v or the last block, option scoring in the protocol."""
    args = select_args(
        data_file, tmp_path, model="tiny-llama", dense=dense, method="ekfac" if dense else "hyperinf", fractions=(0.2,)
    )
    run_select(args)
    frame = pd.read_parquet(args.out / "scores.parquet")
    assert frame["score"].notna().all() and frame["score"].std() > 0
    learner = make_learner(args, ["negative", "positive"])
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    if dense:
        assert (
            learner.blocks
            and all(b.startswith("model.layers.1.") for b in learner.blocks)
            and all(".layers.1." in n for n in trainable)
        )
    else:
        assert learner.blocks == "lora" and trainable and all("lora_" in n for n in trainable)
    study = StudyArgs(
        **{k: v for k, v in vars(args).items() if k not in ("n_pool", "n_target", "out", "fractions")},
        n_pool=30,
        n_target=10,
        n_test=10,
        fractions=(0.2,),
        methods=("tracin",),
        continue_epochs=1,
        random_draws=1,
        out=tmp_path / "study",
    )
    run_study(study)
    assert pd.read_csv(study.out / "results.csv")["accuracy"].between(0, 1).all()


LLAMA = "--model tiny-llama --rank 2 --epochs 1 --batch-size 8 --max-length 32 --no-progress"


@pytest.mark.parametrize(
    "options, message",
    [
        ("--damping -1", ["damping must be >= 0, got -1.0", "pass 0 (undamped) or a positive factor"]),
        (
            "--n-pool 5000",
            [
                "--n-pool 5000 + --n-target 10 ask for 5010 examples",
                "has 60 usable ones",
                "lower --n-pool / --n-target",
            ],
        ),
        (
            "--n-pool 0 --n-target 100",
            [
                "holding out --n-target 100 leaves no pool examples of the 60 usable rows of --task",
                "lower --n-target (n_target)",
            ],
        ),
        ("--n-pool -5", ["--n-pool -5: must be at least 0 (0: the whole pool)"]),
        ("--cache-gib -1", ["--cache-gib -1: must be at least 0"]),
    ],
    ids=["negative damping", "pool beyond the data", "target beyond the data", "negative pool", "negative cache"],
)
def test_bad_sizes_and_influence_options_name_selects_own_options(data_file, tmp_path, capsys, options, message):
    """Checked before the warm-up: one line naming select's options (not mislabel's --n-train), nothing written."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = f"select --task {data_file} {LLAMA} --n-target 10 --out {out} --cache-dir {cache} {options}".split()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hyperinf: error: ")
    assert all(fragment in err for fragment in message), err
    assert "--n-train" not in err and "--n-val" not in err
    assert not out.exists() and not cache.exists()


def test_an_out_that_is_a_file_is_refused_before_the_warm_up(data_file, tmp_path, capsys):
    afile, cache = tmp_path / "afile", tmp_path / "cache"
    afile.write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        main(f"select --task {data_file} {LLAMA} --out {afile} --cache-dir {cache}".split())
    assert stopped.value.code == 2
    assert (
        f"argument --out: {afile} exists and is not a folder: pass a new or existing folder" in capsys.readouterr().err
    )
    assert afile.read_text() == "mine" and not cache.exists()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_jsonl_pool_keeps_every_usable_row_and_its_selections_read_back(tmp_path, capsys):
    """Duplicates and conflicting copies stay (each its own row id), unusable rows are named and recorded, and the
    selected_<pct>.jsonl select writes is read back as --task and as --target."""
    rows = synthetic_frame(40).to_dict("records")
    rows[5]["text"] = "   "
    rows[9]["label"] = None
    rows += [dict(rows[0]), {**rows[1], "label": "negative" if rows[1]["label"] == "positive" else "positive"}]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    target = tmp_path / "target.csv"
    synthetic_frame(10, seed=1).to_csv(target, index=False)
    common = f"select {LLAMA} --method tracin --cache-dir {tmp_path / 'cache'} --n-pool 0".split()
    first = tmp_path / "first"
    assert main([*common, "--task", str(pool), "--target", str(target), "--fraction", "0.5", "--out", str(first)]) == 0
    printed = capsys.readouterr().out
    assert f"skipped 2 of 42 rows of {pool}: rows 5 (empty text), 9 (missing label)\n" in printed
    written = json.loads((first / "arguments.json").read_text())["skipped_rows"]
    assert written == {"task": {"5": "empty text", "9": "missing label"}, "target": {}}
    scores = pd.read_parquet(first / "scores.parquet").set_index("row_id")
    assert sorted(scores.index) == [i for i in range(42) if i not in (5, 9)]
    assert scores.loc[40, "text"] == scores.loc[0, "text"]  # a duplicate: scored (and trained on) twice
    assert scores.loc[41, "text"] == scores.loc[1, "text"] and scores.loc[41, "label"] != scores.loc[1, "label"]

    selected = first / "selected_50pct.jsonl"
    kept = [json.loads(line) for line in selected.read_text().splitlines()]
    second = tmp_path / "second"
    read_back = ["--task", str(selected), "--target", str(selected), "--fraction", "0.5", "--out", str(second)]
    assert main([*common, *read_back]) == 0
    again = pd.read_parquet(second / "scores.parquet").sort_values("row_id")
    assert again["row_id"].tolist() == list(range(len(kept)))  # a row id is the row's position in the file
    assert again["text"].tolist() == [row["text"] for row in kept]
    assert again["label"].tolist() == [row["label"] for row in kept]


def test_a_saved_model_and_adapter_are_selected_with_as_given_or_warmed_up(data_file, tmp_path, user_models):
    """--model FOLDER --adapter DIR: with --no-warmup nothing is trained and the adapter's own weights score
    (TracIn equals -<v, g_k> of the loaded model); without it, the warm-up trains the adapter further."""
    from hyperinf.hf.models import load_model

    given = select_args(
        data_file, tmp_path, model=str(user_models.llama), adapter=user_models.adapter, no_warmup=True,
        method="tracin", fractions=(0.5,), dtype="float64", cache_dir=tmp_path / "cache" / "adapters",
    )  # fmt: skip
    result = run_select(given)
    arguments = json.loads((given.out / "arguments.json").read_text())
    assert arguments["warm_up"]["seconds"] == 0.0 and arguments["warm_up"]["cached"] is False
    assert not list((tmp_path / "cache" / "adapters").glob("*.safetensors"))  # no training, nothing cached

    learner = make_learner(given, ["negative", "positive"])
    split = load_pool_split(given)
    loaded = load_model(user_models.llama, adapter=user_models.adapter)
    assert learner.blocks == "lora"
    params = [p for n, p in loaded.model.named_parameters() if "lora_" in n]

    def gradient(pairs):
        batch = learner.collate(pairs)
        loss = learner.loss(loaded.model, batch).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    v = torch.stack([gradient([pair]) for pair in split.pairs("target")]).mean(0)
    expected = torch.stack([-(v * gradient([pair])).sum() for pair in split.pairs("pool")])
    torch.testing.assert_close(result["scores"].double(), expected, rtol=1e-4, atol=1e-6)

    warmed = select_args(
        data_file, tmp_path, model=str(user_models.llama), adapter=user_models.adapter, method="tracin",
        fractions=(0.5,), out=tmp_path / "warmed", cache_dir=tmp_path / "cache" / "adapters",
    )  # fmt: skip
    run_select(warmed)
    record = json.loads((warmed.out / "arguments.json").read_text())["warm_up"]
    assert record["cached"] is False and record["key"] != arguments["warm_up"]["key"]
    assert len(list((tmp_path / "cache" / "adapters").glob("*.safetensors"))) == 1


def test_multiple_choice_rows_are_selected_on_a_saved_causal_lm_and_read_back(tmp_path, user_models, capsys):
    """Rows of another format: held-out targets, the mean completion loss, no labels, and selections that are
    rows of the same format again (every column as read)."""
    rows = [
        {
            "question": f"Which word follows {w}?",
            "choices": [f"{w}s", "blue", "seven"],
            "answer": i % 3 if i % 2 else [f"{w}s", "blue", "seven"][i % 3],  # an index or the choice's text
            "id": f"q{i}",
        }
        for i, w in enumerate(["cat", "dog", "sun", "tree", "car", "cup", "pen", "box", "hat", "map", "bag", "key"])
    ]
    rows.append({"question": "", "choices": ["a", "b"], "answer": 0, "id": "blank"})
    pool = write_jsonl(tmp_path / "mc.jsonl", rows)
    options = {"--model": user_models.llama, "--adapter": user_models.adapter, "--task": pool, "--n-target": 3,
               "--fraction": "0.25,0.5", "--method": "tracin", "--epochs": 1, "--batch-size": 4,
               "--cache-dir": tmp_path / "cache", "--out": tmp_path / "out"}  # fmt: skip

    def command(**changes: Any) -> list[str]:
        given = options | {f"--{k.replace('_', '-')}": v for k, v in changes.items()}
        return ["select", "--no-progress", *(str(x) for pair in given.items() for x in pair)]

    argv = command()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "12 of 13 rows as multiple-choice examples; skipped 1: rows 12 (empty question)" in printed
    frame = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert len(frame) == 9 and set(frame["row_id"]).isdisjoint({12}) and frame["score"].std() > 0
    chosen = [json.loads(line) for line in (tmp_path / "out" / "selected_50pct.jsonl").read_text().splitlines()]
    best = frame.sort_values(["score", "row_id"])["row_id"].tolist()
    assert [r["row_id"] for r in chosen] == best[: round(0.5 * 9)]
    assert all(r["id"] == rows[r["row_id"]]["id"] and r["choices"] == rows[r["row_id"]]["choices"] for r in chosen)
    assert "the default for rows without labels" in printed
    assert json.loads((tmp_path / "out" / "arguments.json").read_text())["normalized"] is True
    for flag, same in (("--normalize", True), ("--no-normalize", False)):  # the cosine is the default for rows
        assert main([*command(out=tmp_path / flag), flag]) == 0
        scores = pd.read_parquet(tmp_path / flag / "scores.parquet")["score"]
        assert bool((scores.to_numpy() == frame["score"].to_numpy()).all()) is same
    assert frame["score"].abs().max() <= 1.0
    again = command(task=tmp_path / "out" / "selected_50pct.jsonl", n_target=1, out=tmp_path / "again")
    assert main(again) == 0  # a selection reads back as a pool
    assert main([*command(out=tmp_path / "x"), "--balance"]) == 2
    assert "has no labels" in capsys.readouterr().err


def test_labelled_rows_under_other_column_names_stay_labelled(tmp_path):
    """--text-column / --label-column name a labelled table: it is not read as plain text rows."""
    from hyperinf.app.select_rows import reads_rows

    frame = synthetic_frame().rename(columns={"label": "sentiment"})
    frame.to_csv(tmp_path / "pool.csv", index=False)
    args = select_args(tmp_path / "pool.csv", tmp_path, label_column="sentiment")
    assert not reads_rows(args)
    assert reads_rows(select_args(tmp_path / "pool.csv", tmp_path, label_column="sentiment", format="text"))
    pd.DataFrame({"text": ["a b", "c d"]}).to_csv(tmp_path / "plain.csv", index=False)
    assert reads_rows(select_args(tmp_path / "plain.csv", tmp_path))


def test_per_target_takes_turns_over_each_targets_own_ranking(data_file, tmp_path, user_models):
    """--strategy per-target on a model as given: the selection is the round robin over each target row's
    TracIn ranking, computed here from single-example gradients."""
    from hyperinf.hf.models import load_model
    from hyperinf.selection import round_robin

    args = select_args(
        data_file, tmp_path, model=str(user_models.llama), adapter=user_models.adapter, no_warmup=True,
        method="tracin", strategy="per-target", fractions=(0.25, 0.5), dtype="float64",
    )  # fmt: skip
    result = run_select(args)
    learner, split = make_learner(args, ["negative", "positive"]), load_pool_split(args)
    loaded = load_model(user_models.llama, adapter=user_models.adapter)
    params = [p for n, p in loaded.model.named_parameters() if "lora_" in n]

    def gradient(pair):
        loss = learner.loss(loaded.model, learner.collate([pair])).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    pool = torch.stack([gradient(p) for p in split.pairs("pool")])
    target = torch.stack([gradient(p) for p in split.pairs("target")])
    rankings = torch.argsort(-(pool @ target.T), dim=0, stable=True).T  # most helpful (most negative score) first
    for fraction, picked in result["selections"].items():
        size = round(fraction * 40)
        assert picked.tolist() == round_robin(rankings[:, :size], size).tolist()
    with pytest.raises(ConfigurationError, match="no --balance"):
        select_args(data_file, tmp_path, strategy="per-target", balance=True)
