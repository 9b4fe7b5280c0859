"""Convergence of inverse-Hessian-vector approximations on synthetic curvature (Sec. 4, Fig. 1, App. I).

For every cell ``(d, N, distribution)`` of the grid: ``M = (1/N) sum_i s_i s_i^T + lambda I``
(``lambda = 0.01``), a random ``v``, the target ``M^{-1} v`` from a float64 Cholesky solve, and
the error ``||M^{-1} v - approx_t||`` of every method at every iteration ``t = 0..max_iter``:

- ``schulz-auto``: Schulz's iteration from ``X0 = alpha I``, ``alpha`` from a spectral bound
  (the library default); approx ``X_t v``.
- ``schulz-fixed``: the paper's ``X0 = 5e-4 I``.
- ``lissa-unscaled``: ``r_0 = v``, ``r_t = v + (I - M) r_{t-1}``, as the paper ran it; it
  diverges once ``lambda_max(M) >= 2``.
- ``lissa-scaled``: the same on ``M / s`` with ``s`` a bound on ``lambda_max``, approx ``r_t / s``
  (converges, at a rate set by the condition number).
- ``datainf``: DataInf's closed form ``(1/N) sum_i (lambda I + s_i s_i^T)^{-1} v`` (no
  iterations: the same value at every ``t``).
- ``neumann``: the matrix Neumann series ``X_t = sum_{k<t} (I - M)^k`` (the paper's, unscaled),
  approx ``X_t v``: LiSSA on the whole inverse, so ``X_{t+1} v = r_t``.
- ``sor-0.5`` / ``sor-1.5``: successive over-relaxation on ``M x = v`` from ``x_0 = 0``.

An iteration that stopped early is recorded at every later ``t`` too: a converged (or stalled)
one holds its last value (state ``stopped``); a diverged one (the library stops it once its
residual passes 1e6) records ``inf`` (state ``diverged``), never a crash.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hyperinf.linalg import cholesky_solve, neumann_series, schulz_inverse
from hyperinf.paper.solvers import sor
from hyperinf.paper.synthetic import (
    DISTRIBUTIONS,
    dtype_of,
    make_problem,
    new_figure,
    progress,
    set_threads,
    write_outputs,
)

DEFAULT_DIMS = (512, 1024)
FULL_DIMS = (512, 1024, 2048, 4096)
SIZES = (200, 800, 6400, 12800)
PAPER_INIT = 5e-4


@dataclass
class ConvergenceArgs:
    """Settings of ``hyperinf experiment convergence`` (written next to the results as JSON)."""

    out: Path = Path("runs/convergence")
    dims: tuple[int, ...] = DEFAULT_DIMS
    sizes: tuple[int, ...] = SIZES
    distributions: tuple[str, ...] = tuple(DISTRIBUTIONS)
    methods: tuple[str, ...] | None = None  # None: all of METHODS
    max_iter: int = 40
    lam: float = 0.01
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"
    threads: int | None = None  # CPU threads for torch; None: torch's default
    progress: bool = True
    figures: bool = True


@dataclass
class Trace:
    """Errors measured at iterations ``0..len(errors)-1`` and why the method stopped there."""

    errors: list[float] = field(default_factory=list)
    stop: str = "max_iter"


@dataclass
class Cell:
    """One grid cell in the working precision: ``M``, ``S``, ``v``, damping and the target."""

    M: Tensor
    S: Tensor
    v: Tensor
    lam: float
    target: Tensor

    def error(self, approx: Tensor) -> float:
        return float(torch.linalg.vector_norm(approx.to(self.target.dtype) - self.target))


def _schulz(init: str | float) -> Callable[[Cell, int], Trace]:
    def run(cell: Cell, max_iter: int) -> Trace:
        options = {"init": init, "lower_bound": cell.lam, "on_fail": "ignore"}
        X0, _ = schulz_inverse(cell.M, max_iter=0, **options)
        trace = Trace([cell.error(X0 @ cell.v)])
        _, info = schulz_inverse(
            cell.M, max_iter=max_iter, callback=lambda t, X: trace.errors.append(cell.error(X @ cell.v)), **options
        )
        trace.stop = info.stop_reason
        return trace

    return run


def _lissa(scaled: bool) -> Callable[[Cell, int], Trace]:
    def run(cell: Cell, max_iter: int) -> Trace:
        # neumann_series starts from x_0 = 0, so its x_{t+1} is LiSSA's r_t (which starts at v).
        trace = Trace()
        _, info = neumann_series(
            cell.M,
            cell.v,
            max_iter=max_iter + 1,
            scale=None if scaled else 1.0,
            on_fail="ignore",
            callback=lambda t, x: trace.errors.append(cell.error(x)),
        )
        trace.stop = info.stop_reason
        return trace

    return run


def _from_zero(solve: Callable[..., tuple[Tensor, Any]], use_v: bool, matrix: bool) -> Callable[[Cell, int], Trace]:
    """Methods started from 0 (Neumann on the matrix, SOR on ``v``), recording ``X_t v`` or ``x_t``."""

    def run(cell: Cell, max_iter: int) -> Trace:
        trace = Trace([cell.error(torch.zeros_like(cell.v))])
        measure = (lambda X: X @ cell.v) if matrix else (lambda x: x)
        _, info = solve(
            cell.M,
            cell.v if use_v else None,
            max_iter=max_iter,
            on_fail="ignore",
            callback=lambda t, x: trace.errors.append(cell.error(measure(x))),
        )
        trace.stop = info.stop_reason
        return trace

    return run


def datainf_inverse_vector(S: Tensor, v: Tensor, lam: float) -> Tensor:
    """DataInf's ``(1/N) sum_i (lam I + s_i s_i^T)^{-1} v`` by Sherman-Morrison, vectorised.

    ``= (1/lam) (v - (1/N) sum_i s_i <s_i, v> / (lam + ||s_i||^2))``; ``S [N, d]``, ``v [d]``.
    """
    coefficients = (S @ v) / (lam + (S * S).sum(1))
    return (v - S.T @ coefficients / S.shape[0]) / lam


def _datainf(cell: Cell, max_iter: int) -> Trace:
    return Trace([cell.error(datainf_inverse_vector(cell.S, cell.v, cell.lam))], stop="closed-form")


def _neumann_matrix(M: Tensor, b: None, **kwargs: Any) -> tuple[Tensor, Any]:
    return neumann_series(M, b, scale=1.0, **kwargs)


def _sor(omega: float) -> Callable[..., tuple[Tensor, Any]]:
    return lambda M, b, **kwargs: sor(M, b, omega=omega, **kwargs)


METHODS: dict[str, Callable[[Cell, int], Trace]] = {
    "schulz-auto": _schulz("auto"),
    "schulz-fixed": _schulz(PAPER_INIT),
    "lissa-unscaled": _lissa(scaled=False),
    "lissa-scaled": _lissa(scaled=True),
    "datainf": _datainf,
    "neumann": _from_zero(_neumann_matrix, use_v=False, matrix=True),
    "sor-0.5": _from_zero(_sor(0.5), use_v=True, matrix=False),
    "sor-1.5": _from_zero(_sor(1.5), use_v=True, matrix=False),
}


def _trace_rows(trace: Trace, max_iter: int, closed_form: bool) -> list[tuple[float, str]]:
    """``(error, state)`` for ``t = 0..max_iter``: measured, held after a stop, or inf after divergence."""
    rows = []
    for t in range(max_iter + 1):
        if t < len(trace.errors):
            error = trace.errors[t]
            state = "diverged" if not math.isfinite(error) else ("closed-form" if closed_form else "iterating")
        elif trace.stop == "diverged" or not math.isfinite(trace.errors[-1]):
            error, state = math.inf, "diverged"
        else:
            error, state = trace.errors[-1], "stopped"
        rows.append((error, state))
    return rows


def run_cell(
    d: int, n: int, distribution: str, args: ConvergenceArgs
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every method on one grid cell: (per-iteration rows, one summary row per method)."""
    problem = make_problem(d, n, distribution, args.seed, args.lam, args.device)
    target = cholesky_solve(problem.M, problem.v)
    dtype = dtype_of(args.dtype)
    cell = Cell(problem.M.to(dtype), problem.S.to(dtype), problem.v.to(dtype), args.lam, target)
    target_norm = float(torch.linalg.vector_norm(target))
    key = {"distribution": distribution, "d": d, "n": n, "seed": args.seed}
    rows, summary = [], []
    for name in args.methods or tuple(METHODS):
        start = time.perf_counter()
        trace = METHODS[name](cell, args.max_iter)
        seconds = time.perf_counter() - start
        filled = _trace_rows(trace, args.max_iter, closed_form=trace.stop == "closed-form")
        for t, (error, state) in enumerate(filled):
            rows.append(
                {
                    "method": name,
                    **key,
                    "iteration": t,
                    "error": error,
                    "relative_error": error / target_norm,
                    "state": state,
                }
            )
        finite = [e for e in trace.errors if math.isfinite(e)]
        summary.append(
            {
                "method": name,
                **key,
                "final_relative_error": filled[-1][0] / target_norm,
                "best_relative_error": min(finite) / target_norm if finite else math.inf,
                "iterations_run": len(trace.errors) - 1,
                "stop": trace.stop,
                "diverged": filled[-1][1] == "diverged",
                "seconds": seconds,
            }
        )
    return rows, summary


def run_convergence(args: ConvergenceArgs) -> dict[str, Any]:
    """Run the grid, write ``convergence.csv``, ``summary.csv``, figures and ``arguments.json``.

    Returns ``{"rows": DataFrame, "summary": DataFrame}``; prints the summary table.
    """
    import pandas as pd

    unknown = [m for m in args.methods or () if m not in METHODS]
    unknown += [dist for dist in args.distributions if dist not in DISTRIBUTIONS]
    if unknown:
        raise ValueError(f"unknown method(s)/distribution(s) {unknown}")
    set_threads(args.threads)
    grid = [(d, n, dist) for dist in args.distributions for d in args.dims for n in args.sizes]
    rows, summary = [], []
    for d, n, dist in progress(grid, args.progress, len(grid), "convergence grid"):
        cell_rows, cell_summary = run_cell(d, n, dist, args)
        rows += cell_rows
        summary += cell_summary
    frame, summary_frame = pd.DataFrame(rows), pd.DataFrame(summary)
    figures = {f"convergence_{dist}": plot_distribution(frame, dist, args.lam) for dist in args.distributions}
    write_outputs(args.out, args, {"convergence": frame, "summary": summary_frame}, figures if args.figures else {})
    print(summary_markdown(summary_frame))
    print(f"\nresults written to {args.out}/")
    return {"rows": frame, "summary": summary_frame}


def summary_markdown(summary: Any) -> str:
    """Final relative error at ``max_iter`` per (distribution, method) x (d, N); ``div`` = diverged."""
    columns = sorted({(int(d), int(n)) for d, n in zip(summary["d"], summary["n"])})
    header = ["distribution", "method", *(f"d={d} N={n}" for d, n in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (dist, method), group in summary.groupby(["distribution", "method"], sort=False):
        by_cell = {(int(r.d), int(r.n)): r for r in group.itertuples()}
        cells = ["div" if by_cell[c].diverged else f"{by_cell[c].final_relative_error:.0e}" for c in columns]
        lines.append(f"| {DISTRIBUTIONS[dist].label} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_distribution(frame: Any, distribution: str, lam: float) -> Any:
    """One panel per (d, N) with every method's relative error against the iteration (log scale)."""
    part = frame[frame["distribution"] == distribution]
    dims, sizes = sorted(part["d"].unique()), sorted(part["n"].unique())
    fig, axes = new_figure(len(dims), len(sizes))
    for (i, d), (j, n) in ((a, b) for a in enumerate(dims) for b in enumerate(sizes)):
        ax = axes[i][j]
        panel = part[(part["d"] == d) & (part["n"] == n)]
        for method, curve in panel.groupby("method", sort=False):
            finite = curve[curve["relative_error"].map(math.isfinite)]
            line = ax.semilogy(finite["iteration"], finite["relative_error"], label=method, lw=1.2)[0]
            if curve["state"].eq("diverged").any() and len(finite):
                ax.plot(finite["iteration"].iloc[-1:], finite["relative_error"].iloc[-1:], "x", color=line.get_color())
        ax.set_title(f"d={d}, N={n}", fontsize=9)
        ax.tick_params(labelsize=7)
        if i == len(dims) - 1:
            ax.set_xlabel("iteration", fontsize=8)
        if j == 0:
            ax.set_ylabel("||M^-1 v - x|| / ||M^-1 v||", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"s, v ~ {DISTRIBUTIONS[distribution].label}, lambda = {lam:g}; x: diverged", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
