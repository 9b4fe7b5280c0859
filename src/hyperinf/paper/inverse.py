"""Inverse of a synthetic curvature matrix: error and time of seven methods (App. H, Tables 9-10).

``M = (1/N) sum_i s_i s_i^T + lambda I`` with ``s_i ~ N(0, 1)``, ``N = 12800``, for each ``d`` and
seed; every method inverts the same ``M`` in the working precision (float32 by default, as the
paper's figures imply), and is scored by the relative Frobenius error
``||X - M^{-1}||_F / ||M^{-1}||_F`` against a float64 Cholesky inverse of that same matrix.

Methods: ``gaussian-elimination`` (our own Gauss-Jordan with partial pivoting), ``cg`` and
``gmres`` (each column of ``I`` its own solve, a fixed number of iterations as the paper, all
columns advanced together as one batched solve), ``torch.linalg.inv``, ``cholesky``,
``schulz-20`` (at most 20 Schulz steps, fewer if it reaches the rounding floor) and ``schulz-tol``
(Schulz to the default tolerance of the precision). Times are wall-clock seconds of the call
alone (synchronised on a GPU), after one untimed warm-up of every method.

The paper's Table 9 reports absolute errors ``||X - A^{-1}||_F`` for what must be the *unnormalised*
``A = sum_i s_i s_i^T + ...`` (its float32 errors of 3e-11 at d = 16 are only possible for an
inverse of size ~1/N). ``paper_scale_error = relative_error * ||M^{-1}||_F / N`` converts ours
to that scale: the absolute error of the same relative accuracy on ``N M``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hyperinf.errors import HyperinfError
from hyperinf.linalg import cholesky_inverse, schulz_inverse
from hyperinf.paper.solvers import conjugate_gradient, gmres
from hyperinf.paper.synthetic import (
    dtype_of,
    make_problem,
    new_figure,
    progress,
    set_threads,
    timed,
    write_outputs,
)

DIMS = (16, 64, 256, 1024, 4096)


class SingularMatrixError(HyperinfError, ValueError):
    """Gaussian elimination met a column without a nonzero pivot: the matrix is singular."""


def gaussian_elimination_inverse(A: Tensor) -> Tensor:
    """``A^{-1}`` by Gauss-Jordan elimination with partial pivoting on ``[A | I]``.

    One step per pivot column; each step is vectorised row operations on the whole augmented
    matrix (a row swap, a row scaling and a rank-one update), ``2 d^3`` flops in ``d`` steps.
    ``A [d, d]``, any invertible matrix (not only SPD); raises :class:`SingularMatrixError`.
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix [d, d]; got {tuple(A.shape)}")
    d = A.shape[0]
    W = torch.cat([A, torch.eye(d, dtype=A.dtype, device=A.device)], dim=1)
    for k in range(d):
        p = k + int(W[k:, k].abs().argmax())
        if W[p, k] == 0:
            raise SingularMatrixError(f"column {k} has no nonzero pivot: the matrix is singular")
        if p != k:
            W[[k, p]] = W[[p, k]]
        pivot_row = W[k, k:] / W[k, k]
        factors = W[:, k].clone()
        factors[k] = 0
        W[:, k:].addr_(factors, pivot_row, alpha=-1)  # columns < k are already unit columns
        W[k, k:] = pivot_row
    return W[:, d:].clone()


def _krylov(solver: Callable[..., tuple[Tensor, Any]]) -> Callable[[Tensor, int], tuple[Tensor, int]]:
    def run(M: Tensor, iterations: int) -> tuple[Tensor, int]:
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        # tol=0: a fixed number of steps, as the paper; GMRES's Krylov space is full after d steps.
        steps = min(iterations, M.shape[-1]) if solver is gmres else iterations
        X, info = solver(M, eye, max_iter=steps, tol=0.0, on_fail="ignore")
        return X, info.iterations

    return run


def _schulz(fixed_count: bool) -> Callable[[Tensor, int], tuple[Tensor, int]]:
    def run(M: Tensor, iterations: int) -> tuple[Tensor, int]:
        options = {"max_iter": iterations, "tol": 0.0} if fixed_count else {"max_iter": 100}
        X, info = schulz_inverse(M, on_fail="ignore", **options)
        return X, info.iterations

    return run


def _direct(inverse: Callable[[Tensor], Tensor]) -> Callable[[Tensor, int], tuple[Tensor, int]]:
    return lambda M, iterations: (inverse(M), 0)


METHODS: dict[str, Callable[[Tensor, int], tuple[Tensor, int]]] = {
    "gaussian-elimination": _direct(gaussian_elimination_inverse),
    "cg": _krylov(conjugate_gradient),
    "gmres": _krylov(gmres),
    "torch.linalg.inv": _direct(torch.linalg.inv),
    "cholesky": _direct(cholesky_inverse),
    "schulz-20": _schulz(fixed_count=True),
    "schulz-tol": _schulz(fixed_count=False),
}


@dataclass
class InverseArgs:
    """Settings of ``hyperinf experiment inverse`` (written next to the results as JSON)."""

    out: Path = Path("runs/inverse")
    dims: tuple[int, ...] = DIMS
    n: int = 12800
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    iterations: int = 20
    time_budget: float = 60.0
    lam: float = 0.01
    distribution: str = "normal-0-1"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # CPU threads for torch; None: torch's default
    progress: bool = True
    figures: bool = True


def _predicted_seconds(history: dict[int, float], d: int) -> float:
    """Time at ``d`` extrapolated as ``d^3`` from the largest smaller size measured (0 if none)."""
    smaller = [size for size in history if size < d]
    if not smaller:
        return 0.0
    size = max(smaller)
    return history[size] * (d / size) ** 3


def _measure(
    methods: list[str], d: int, seed: int, args: InverseArgs, fastest: dict[str, dict[int, float]], key: dict[str, Any]
) -> list[dict[str, Any]]:
    """Time each method on the seed's matrix and score it against the float64 inverse."""
    problem = make_problem(d, args.n, args.distribution, seed, args.lam, args.device)
    M = problem.M.to(dtype_of(args.dtype))
    reference = cholesky_inverse(M.to(torch.float64))
    reference_norm = float(torch.linalg.matrix_norm(reference))
    rows = []
    for name in methods:
        (X, iterations), seconds = timed(lambda: METHODS[name](M, args.iterations), args.device)
        fastest[name][d] = min(seconds, fastest[name].get(d, math.inf))
        error = float(torch.linalg.matrix_norm(X.to(torch.float64) - reference)) / reference_norm
        rows.append(
            {
                "method": name,
                **key,
                "status": "ok",
                "seconds": seconds,
                "relative_error": error,
                "paper_scale_error": error * reference_norm / args.n,
                "iterations": iterations,
            }
        )
    return rows


def run_inverse(args: InverseArgs) -> dict[str, Any]:
    """Run every method on every (d, seed); write ``inverse.csv``, ``summary.csv``, figures, args.

    A method whose time at ``d``, extrapolated as ``d^3`` from its fastest run (the least
    disturbed by other load on the machine) at the largest smaller ``d``, exceeds ``time_budget``
    seconds is skipped there and at every larger ``d``
    (rows with ``status = "skipped"``). Returns ``{"rows": DataFrame, "summary": DataFrame}``.
    """
    import pandas as pd

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    set_threads(args.threads)
    dtype = dtype_of(args.dtype)
    warm = make_problem(8, 16, args.distribution, 0, args.lam, args.device).M.to(dtype)
    for name in args.methods:  # first calls pay one-off library set-up: keep it out of the timings
        METHODS[name](warm, args.iterations)
    fastest: dict[str, dict[int, float]] = {name: {} for name in args.methods}
    rows = []
    grid = [(d, seed) for d in sorted(args.dims) for seed in args.seeds]
    for d, seed in progress(grid, args.progress, len(grid), "inverse benchmark"):
        key = {"d": d, "n": args.n, "seed": seed, "dtype": args.dtype, "device": args.device}
        predicted = {name: _predicted_seconds(fastest[name], d) for name in args.methods}
        running = [name for name in args.methods if predicted[name] <= args.time_budget]
        rows += [
            {"method": name, **key, "status": "skipped", "predicted_seconds": predicted[name]}
            for name in args.methods
            if name not in running
        ]
        if running:
            rows += _measure(running, d, seed, args, fastest, key)
    frame = pd.DataFrame(rows)
    summary = summarize(frame)
    figures = {"inverse": plot_inverse(summary)} if args.figures else {}
    write_outputs(args.out, args, {"inverse": frame, "summary": summary}, figures)
    print(summary_markdown(summary))
    print(f"\nresults written to {args.out}/")
    return {"rows": frame, "summary": summary}


def summarize(frame: Any) -> Any:
    """Mean and standard deviation over seeds per (method, d); skipped cells keep a row."""
    import pandas as pd

    records = []
    for (method, d), group in frame.groupby(["method", "d"], sort=False):
        ok = group[group["status"] == "ok"]
        record = {"method": method, "d": d, "runs": len(ok), "status": "ok" if len(ok) else "skipped"}
        for column in ("relative_error", "paper_scale_error", "seconds", "iterations"):
            values = ok[column] if column in ok else pd.Series(dtype=float)
            record[f"{column}_mean"] = values.mean() if len(values) else math.nan
            record[f"{column}_std"] = values.std(ddof=0) if len(values) else math.nan
        records.append(record)
    return pd.DataFrame(records)


def summary_markdown(summary: Any) -> str:
    """Two markdown tables, method x d: relative error, and seconds, each mean ± std over seeds."""
    dims = sorted(summary["d"].unique())
    blocks = []
    for column, fmt, title in (("relative_error", ".1e", "relative Frobenius error"), ("seconds", ".3g", "seconds")):
        lines = [
            f"{title} (mean ± std over seeds)",
            "",
            "| method | " + " | ".join(f"d={d}" for d in dims) + " |",
            "|---|" + "---|" * len(dims),
        ]
        for method, group in summary.groupby("method", sort=False):
            by_d = {int(r["d"]): r for _, r in group.iterrows()}
            cells = [
                "skipped"
                if by_d[d]["status"] == "skipped"
                else f"{by_d[d][column + '_mean']:{fmt}} ± {by_d[d][column + '_std']:{fmt}}"
                for d in dims
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_inverse(summary: Any) -> Any:
    """Time and relative error against ``d`` (log-log), one line per method, like Fig. 11."""
    fig, axes = new_figure(1, 2, width=4.2, height=3.2)
    for method, group in summary[summary["status"] == "ok"].groupby("method", sort=False):
        for ax, column in zip(axes[0], ("seconds", "relative_error")):
            ax.errorbar(
                group["d"],
                group[f"{column}_mean"],
                yerr=group[f"{column}_std"],
                marker="o",
                ms=3,
                label=method,
                capsize=2,
            )
    for ax, label in zip(axes[0], ("seconds", "||X - M^-1||_F / ||M^-1||_F")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d")
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
