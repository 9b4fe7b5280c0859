"""Synthetic curvature matrices of the paper's linear-algebra experiments, and their output writing.

Both ``experiment convergence`` (Sec. 4, Fig. 1, App. I) and ``experiment inverse`` (App. H,
Tables 9-10) build ``M = (1/N) sum_i s_i s_i^T + lambda I`` from ``N`` random vectors
``s_i in R^d``: the damped Fisher matrix of ``N`` training gradients in a ``d``-dimensional block.
The entries of ``s_i`` (and of the right-hand side ``v``) are drawn from one of the five
distributions of App. I. In ``N(mu, sigma)`` the second number is the standard deviation, as
``torch.normal(mean, std)`` and numpy's ``normal(loc, scale)`` take it (the paper's code is
PyTorch); so ``N(0, 5)`` has variance 25.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from hyperinf.results import atomic_write, write_json

T = TypeVar("T")


@dataclass(frozen=True)
class Distribution:
    """Entry distribution of ``s_i`` and ``v``: ``kind`` normal (mean, std) or uniform (low, high)."""

    kind: str
    a: float
    b: float

    @property
    def label(self) -> str:
        return f"{'N' if self.kind == 'normal' else 'U'}({self.a:g},{self.b:g})"

    def sample(self, shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        if self.kind == "normal":
            return torch.randn(*shape, generator=generator, dtype=dtype) * self.b + self.a
        return torch.rand(*shape, generator=generator, dtype=dtype) * (self.b - self.a) + self.a


# The five distributions of App. I, by their command-line names (in the paper's order).
DISTRIBUTIONS: dict[str, Distribution] = {
    "normal-0-1": Distribution("normal", 0.0, 1.0),
    "normal-0.5-1": Distribution("normal", 0.5, 1.0),
    "normal-0-5": Distribution("normal", 0.0, 5.0),
    "normal-0.5-5": Distribution("normal", 0.5, 5.0),
    "uniform-0-1": Distribution("uniform", 0.0, 1.0),
}


@dataclass
class Problem:
    """One synthetic matrix: samples ``S [N, d]``, ``v [d]``, ``M = S^T S / N + lam I`` (float64)."""

    S: Tensor
    v: Tensor
    M: Tensor
    lam: float


def make_problem(
    d: int, n: int, distribution: str, seed: int, lam: float = 0.01, device: str | torch.device = "cpu"
) -> Problem:
    """Draw ``S`` and ``v`` (float64, on the CPU generator so every device sees the same numbers).

    The generator is seeded by ``(seed, d, n, distribution)``, so each cell of a grid has its own
    matrix and rerunning one cell alone reproduces it.
    """
    names = list(DISTRIBUTIONS)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose from {', '.join(names)}")
    key = ((seed * 1_000_003 + d) * 1_000_003 + n) * 16 + names.index(distribution)
    generator = torch.Generator().manual_seed(key % (2**63))
    dist = DISTRIBUTIONS[distribution]
    S = dist.sample((n, d), generator, torch.float64).to(device)
    v = dist.sample((d,), generator, torch.float64).to(device)
    M = S.T @ S / n
    M.diagonal().add_(lam)
    return Problem(S=S, v=v, M=(M + M.T) / 2, lam=lam)


def dtype_of(name: str) -> torch.dtype:
    """``"float32"`` / ``"float64"`` -> the torch dtype."""
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer read afterwards measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """``(call(), seconds)``, synchronised before and after on a GPU."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


def progress(items: Iterable[T], enabled: bool, total: int, desc: str) -> Iterator[T]:
    """A tqdm bar over ``items`` when enabled (the grid of an experiment)."""
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc))


def write_outputs(out: Path, args: Any, tables: dict[str, Any], figures: dict[str, Any]) -> None:
    """Write ``arguments.json``, ``environment.json``, each pandas table as ``<name>.csv`` and each figure as ``<name>.png``.

    Every file is written atomically (temporary file, then rename), so an interrupted run leaves
    no half-written output; figures are closed after saving.
    """
    import matplotlib.pyplot as plt

    write_json(out / "arguments.json", asdict(args))
    write_json(out / "environment.json", environment(args.device))
    for name, table in tables.items():
        atomic_write(out / f"{name}.csv", lambda tmp, table=table: table.to_csv(tmp, index=False))
    for name, figure in figures.items():
        atomic_write(out / f"{name}.png", lambda tmp, figure=figure: figure.savefig(tmp, format="png", dpi=80))
        plt.close(figure)


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch (None: leave torch's default).

    Set it once per process, before any work: with torch 2.13 (CPU, MKL), raising the count again
    after running with 1 thread breaks batched ``torch.linalg.inv`` (MKL "DLASWP" parameter error).
    """
    if threads is not None:
        torch.set_num_threads(threads)


def environment(device: str) -> dict[str, Any]:
    """What the timings depend on: versions, CPU threads, the load on the machine, the device."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": os.getloadavg(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def new_figure(rows: int, cols: int, width: float = 3.0, height: float = 2.4) -> tuple[Any, Any]:
    """A matplotlib figure (Agg backend, no display needed) with a ``rows x cols`` grid of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes
