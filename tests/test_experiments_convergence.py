"""``hyperinf experiment convergence`` on a small grid: the facts Fig. 1 and Figs. 12-16 show."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from plots import assert_plot

from hyperinf.cli import main
from hyperinf.paper.convergence import METHODS, datainf_inverse_vector
from hyperinf.paper.synthetic import DISTRIBUTIONS, make_problem

DIMS, SIZES, MAX_ITER = (24, 48), (30, 3000), 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    argv = [
        "experiment",
        "convergence",
        "--out",
        str(out),
        "--dims",
        "24,48",
        "--sizes",
        "30,3000",
        "--max-iter",
        str(MAX_ITER),
        "--no-progress",
    ]
    assert main(argv) == 0
    return out, pd.read_csv(out / "convergence.csv"), pd.read_csv(out / "summary.csv")


def test_outputs_are_written(run):
    out, _, _ = run
    assert json.loads((out / "arguments.json").read_text())["max_iter"] == MAX_ITER
    for name in DISTRIBUTIONS:
        # one 3 x 2.4 inch panel per (d, N) at 80 dpi, a line per method
        assert_plot(out / f"convergence_{name}.png", (80 * 3 * len(SIZES), int(80 * 2.4 * len(DIMS))), len(METHODS))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_one_row_per_method_cell_and_iteration(run):
    _, rows, _ = run
    key = ["method", "d", "n", "distribution", "iteration"]
    assert not rows.duplicated(key).any()
    assert len(rows) == len(METHODS) * len(DIMS) * len(SIZES) * len(DISTRIBUTIONS) * (MAX_ITER + 1)
    assert set(rows["iteration"]) == set(range(MAX_ITER + 1))
    assert set(rows["state"]) <= {"iterating", "stopped", "diverged", "closed-form"}


def test_auto_init_schulz_reaches_the_float64_target_on_every_distribution(run):
    _, _, summary = run
    schulz = summary[summary["method"] == "schulz-auto"]
    assert len(schulz) == len(DIMS) * len(SIZES) * len(DISTRIBUTIONS)
    assert (schulz["final_relative_error"] < 1e-8).all(), schulz


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
def test_iterations_recorded_equal_the_recursions_written_out(run, distribution):
    """Every ``iterating`` row of Schulz (paper init), unscaled LiSSA, Neumann and DataInf against the
    recursion run here in float64: ``X_{t+1} = X_t (2I - M X_t)`` from ``5e-4 I``; ``r_t = v + (I - M) r_{t-1}``
    from ``r_0 = v``; ``X_t v = r_{t-1}`` (``X_0 = 0``); and the mean of ``(lam I + s_i s_i^T)^{-1} v``."""
    _, rows, _ = run
    for d in DIMS:
        for n in SIZES:
            problem = make_problem(d, n, distribution, seed=0, lam=0.01)
            M, v, eye = problem.M, problem.v, torch.eye(d, dtype=torch.float64)
            target = torch.linalg.solve(M, v)
            X, r, schulz, lissa = 5e-4 * eye, v, [], []
            for _ in range(MAX_ITER + 1):
                schulz.append(X @ v)
                lissa.append(r)
                X, r = X @ (2 * eye - M @ X), v + r - M @ r
            datainf = torch.linalg.solve(0.01 * eye + problem.S[:, :, None] * problem.S[:, None, :], v).mean(0)
            expected = {
                "schulz-fixed": schulz,
                "lissa-unscaled": lissa,
                "neumann": [0 * v] + lissa[:-1],
                "datainf": [datainf] * (MAX_ITER + 1),
            }
            cell = rows[(rows["d"] == d) & (rows["n"] == n) & (rows["distribution"] == distribution)]
            for method, approx in expected.items():
                measured = cell[(cell["method"] == method) & cell["state"].isin(["iterating", "closed-form"])]
                assert len(measured) > 0, (method, d, n)
                for t, error in zip(measured["iteration"], measured["relative_error"]):
                    by_hand = float(torch.linalg.norm(approx[t] - target) / torch.linalg.norm(target))
                    # rounding only: measured <= 2e-15 relative, <= 1.4e-14 absolute at the floor
                    assert error == pytest.approx(by_hand, rel=1e-12, abs=1e-12), (method, d, n, t)


def test_unscaled_lissa_diverges_where_the_paper_says(run):
    """It needs lambda_max(M) < 2: only N(0,1) with N >> d has that (Fig. 12: "converges e.g. for
    N = 6400, d = 512, diverges when d is larger"); every other distribution diverges (Figs. 14-16)."""
    _, _, summary = run
    lissa = summary[summary["method"] == "lissa-unscaled"].set_index(["distribution", "d", "n"])
    for dist in DISTRIBUTIONS:
        for d in DIMS:
            for n in SIZES:
                converges = dist == "normal-0-1" and n > 10 * d
                row = lissa.loc[(dist, d, n)]
                assert bool(row["diverged"]) is not converges, (dist, d, n)
                if converges:
                    assert row["final_relative_error"] < 1e-8


def test_divergence_is_recorded_not_crashed_on(run):
    _, rows, _ = run
    lissa = rows[(rows["method"] == "lissa-unscaled") & (rows["distribution"] == "uniform-0-1")]
    last = lissa[lissa["iteration"] == MAX_ITER]
    assert (last["state"] == "diverged").all() and last["error"].map(math.isinf).all()


def test_datainf_is_a_horizontal_line_equal_to_the_averaged_inverses():
    problem = make_problem(6, 5, "normal-0.5-1", seed=3, lam=0.01)
    S, v, lam = problem.S, problem.v, problem.lam
    eye = torch.eye(6, dtype=torch.float64)
    expected = sum(torch.linalg.solve(lam * eye + torch.outer(s, s), v) for s in S) / len(S)
    # float64: measured 9e-14 relative per entry, 1.2e-14 of the largest
    atol = 1e-12 * float(expected.abs().max())
    torch.testing.assert_close(datainf_inverse_vector(S, v, lam), expected, rtol=1e-11, atol=atol)


def test_datainf_rows_do_not_change_with_the_iteration(run):
    _, rows, _ = run
    datainf = rows[rows["method"] == "datainf"]
    assert (datainf.groupby(["d", "n", "distribution"])["error"].nunique() == 1).all()


def test_matrix_is_reproducible_per_cell_and_distribution_std_is_the_second_number():
    a = make_problem(200, 4000, "normal-0.5-5", seed=0)
    b = make_problem(200, 4000, "normal-0.5-5", seed=0)
    torch.testing.assert_close(a.M, b.M)
    assert a.S.mean().item() == pytest.approx(0.5, abs=0.05)
    assert a.S.std().item() == pytest.approx(5.0, rel=0.01)
