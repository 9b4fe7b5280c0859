"""``hyperinf experiment inverse`` on small sizes: columns, accuracy of every method, skipping."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from plots import assert_plot

from hyperinf.cli import main
from hyperinf.paper.inverse import (
    METHODS,
    SingularMatrixError,
    gaussian_elimination_inverse,
)
from hyperinf.paper.synthetic import make_problem


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inverse")
    argv = [
        "experiment",
        "inverse",
        "--out",
        str(out),
        "--dims",
        "16,48",
        "--n",
        "2000",
        "--seeds",
        "0,1",
        "--no-progress",
    ]
    assert main(argv) == 0
    return out, pd.read_csv(out / "inverse.csv"), pd.read_csv(out / "summary.csv")


def test_table_has_the_columns_and_one_row_per_method_size_and_seed(run):
    out, rows, summary = run
    for column in (
        "method",
        "d",
        "n",
        "seed",
        "status",
        "seconds",
        "relative_error",
        "paper_scale_error",
        "iterations",
    ):
        assert column in rows
    assert len(rows) == len(METHODS) * 2 * 2 and not rows.duplicated(["method", "d", "seed"]).any()
    assert (rows["status"] == "ok").all()
    assert json.loads((out / "arguments.json").read_text())["seeds"] == [0, 1]
    # time and error against d, 4.2 x 3.2 inch panels at 80 dpi, a line per method
    assert_plot(out / "inverse.png", (int(80 * 4.2 * 2), int(80 * 3.2)), len(METHODS))


def test_summary_is_the_mean_and_spread_over_seeds_of_the_rows(run):
    _, rows, summary = run
    assert len(summary) == len(METHODS) * 2 and (summary["runs"] == 2).all()
    for (method, d), group in rows.groupby(["method", "d"]):
        (line,) = summary[(summary["method"] == method) & (summary["d"] == d)].itertuples()
        for column in ("relative_error", "paper_scale_error", "seconds", "iterations"):
            mean = group[column].mean()
            assert getattr(line, f"{column}_mean") == pytest.approx(mean, rel=1e-12), (method, d, column)
            # the population spread over the two seeds: half their difference
            spread = abs(group[column].iloc[0] - group[column].iloc[1]) / 2
            assert getattr(line, f"{column}_std") == pytest.approx(spread, rel=1e-9, abs=1e-300), (method, d, column)


def test_errors_are_against_the_float64_inverse_of_each_seeds_matrix(run):
    """``paper_scale_error = relative_error ||M^{-1}||_F / N`` with ``M^{-1}`` computed here; and no float32
    inverse is closer to the float64 one than float32 rounding allows (an error of 0 would mean a
    float32 reference)."""
    _, rows, _ = run
    for (d, seed), group in rows.groupby(["d", "seed"]):
        norm = float(torch.linalg.matrix_norm(torch.linalg.inv(make_problem(d, 2000, "normal-0-1", seed).M)))
        expected = group["relative_error"] * norm / 2000
        assert group["paper_scale_error"].to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-12), (d, seed)
    # rounding the exact inverse to float32 alone leaves ~3e-8 (half an ulp, 6e-8 relative, per entry);
    # measured 2.8e-8 at the least (Schulz, d = 16)
    assert (rows["relative_error"] > 1e-8).all(), rows[["method", "d", "relative_error"]]


def test_every_method_inverts_to_float32_accuracy(run):
    """M is well conditioned (N >> d), so 20 CG / GMRES steps reach the float32 floor too."""
    _, rows, _ = run
    assert (rows["relative_error"] < 1e-5).all(), rows[["method", "d", "relative_error"]]
    # the paper-scale error is the absolute error of the same relative accuracy on N * M
    assert (rows["paper_scale_error"] < rows["relative_error"]).all()


def test_schulz_20_stops_within_20_steps(run):
    _, rows, _ = run
    assert (rows.loc[rows["method"] == "schulz-20", "iterations"] <= 20).all()


def test_methods_over_the_time_budget_are_skipped_and_marked(tmp_path):
    argv = [
        "experiment",
        "inverse",
        "--out",
        str(tmp_path),
        "--dims",
        "8,4096",
        "--n",
        "64",
        "--seeds",
        "0",
        "--methods",
        "gaussian-elimination",
        "--time-budget",
        "1e-9",
        "--no-progress",
    ]
    assert main(argv) == 0
    rows = pd.read_csv(tmp_path / "inverse.csv").set_index("d")
    assert rows.loc[8, "status"] == "ok" and rows.loc[4096, "status"] == "skipped"
    assert rows.loc[4096, "predicted_seconds"] > 1e-9
    assert "skipped" in pd.read_csv(tmp_path / "summary.csv").set_index("d").loc[4096, "status"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaussian_elimination_with_partial_pivoting_matches_torch_solve(dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 40, generator=g, dtype=torch.float64)
    A[0, 0] = 0.0  # needs a row swap at the first step
    B = torch.randn(40, 3, generator=g, dtype=torch.float64)
    X = gaussian_elimination_inverse(A.to(dtype)) @ B.to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(X.double(), torch.linalg.solve(A, B), rtol=tol, atol=tol)


def test_gaussian_elimination_pivots_on_the_largest_entry():
    # without pivoting the 1e-20 pivot destroys the result in float64
    A = torch.tensor([[1e-20, 1.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(gaussian_elimination_inverse(A), torch.linalg.inv(A))


def test_gaussian_elimination_rejects_singular_and_non_square_matrices():
    with pytest.raises(SingularMatrixError, match="singular"):
        gaussian_elimination_inverse(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="square"):
        gaussian_elimination_inverse(torch.zeros(2, 3))
