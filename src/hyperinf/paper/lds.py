"""``hyperinf experiment lds``: the linear datamodeling score (LDS, Park et al. 2023) of every method.

Draw ``subsets`` random halves of the training set (seeded), retrain the model on each
(``retrain_seeds`` times, losses averaged) and measure every query example's loss. A method's LDS
for one query is Spearman's correlation over the subsets between the summed pairwise scores
(of the model trained on the whole training set) of each subset's members and the query's
measured loss (:func:`hyperinf.metrics.linear_datamodeling_score`). Under hyperinf's sign a
positive score is harmful, so a subset holding more of them ends with a higher loss: a good
method's LDS is positive. The table reports the mean over queries with a bootstrap 95% interval,
at each method's default damping and at the best of a damping sweep. With ``--index-dims`` the first
method is also scored from a gradient index (:mod:`hyperinf.index`) at each of those dimensions:
the LDS of projected scores beside the unprojected ones.

Every training goes through :func:`hyperinf.app.finetune.train_or_load`, cached under a key of the
setting, the schedule and the examples, so a rerun or an interrupted run retrains only what is
missing; scores are recomputed (cheap next to the retrainings).

The settings (data set and model) and the retraining are in :mod:`hyperinf.paper.retraining`.

By default every subset is retrained from the same seeds (``seed + offset``), which isolates the
data's effect; ``--independent-seeds`` gives each subset its own (Park et al.'s and dattri's LDS).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hyperinf.app.arguments import (
    InfluenceOptions,
    add_options,
    float_list,
    from_namespace,
    int_list,
    option,
)
from hyperinf.app.report import new_figure, save_figure
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import (
    DataError,
    HyperinfError,
    NotConvergedWarning,
)
from hyperinf.index import GradientIndex, index_methods, needs_kronecker
from hyperinf.metrics import bootstrap_interval, linear_datamodeling_score
from hyperinf.paper.retraining import (
    SETTINGS,
    RetrainArgs,
    Setting,
    Trainer,
    check_retrain_args,
    fitted_engine,
)
from hyperinf.results import atomic_write, write_json

DEFAULT_DAMPING = InfluenceOptions().damping  # every method is scored at it, beside the swept dampings
DAMPING_FREE = ("tracin",)  # h = v: computed once, at the default damping


@dataclass
class LdsArgs(RetrainArgs):
    """Settings of ``hyperinf experiment lds``."""

    subsets: int = option(50, help="random half subsets retrained on, M (default: %(default)s)")
    retrain_seeds: int = option(
        1, help="trainings per subset with different seeds, losses averaged (default: %(default)s)"
    )
    independent_seeds: bool = option(
        False,
        help="retrain each subset from its own seeds (Park et al., dattri) instead of the same ones for every subset",
    )
    dampings: tuple[float, ...] = option(
        (1e-3, 1e-2, 1e-1, 1.0),
        parse=float_list,
        help="comma-separated dampings swept beside the default (default: %(default)s)",
    )
    index_dims: tuple[int, ...] = option(
        (),
        parse=int_list,
        help="also score the first method from a gradient index (hyperinf.index, float16 rows, preconditioned in "
        "the projected space) at each of these comma-separated --dim values, 0 for whole; rows '<method> idx<dim>' "
        "(default: none)",
    )
    bootstrap_draws: int = 1000


def check_args(args: LdsArgs) -> None:
    """Refuse settings the experiment cannot run with, before any data is read or model trained."""
    check_retrain_args(args)
    if args.subsets < 3:
        raise DataError(
            f"--subsets {args.subsets}: a rank correlation over subsets needs at least 3 of them (the LDS paper uses 50 or more)"
        )
    if not args.dampings or min(args.dampings) <= 0:
        raise DataError(f"--dampings must be positive, got {','.join(map(str, args.dampings)) or '(none)'}")
    if args.retrain_seeds < 1:
        raise DataError(f"--retrain-seeds must be at least 1, got {args.retrain_seeds}")
    if any(dim < 0 for dim in args.index_dims):
        raise DataError(f"--index-dims must be at least 0 (0: whole), got {','.join(map(str, args.index_dims))}")
    if args.index_dims and args.methods[0] not in index_methods():
        raise DataError(
            f"--index-dims scores the first of --methods from an index, which preconditions with "
            f"{', '.join(index_methods())}; {args.methods[0]} is not one: put one of them first"
        )


def subset_masks(n_train: int, subsets: int, seed: int) -> torch.Tensor:
    """``[subsets, n_train]`` booleans, each row a random half (``n_train // 2`` examples) drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(subsets, n_train, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(n_train, generator=generator)[: n_train // 2]] = True
    return masks


def subset_seed(args: LdsArgs, subset: int, offset: int) -> int:
    """Seed of the ``offset``-th retraining on subset ``subset``: the same for every subset, or its own with ``independent_seeds``."""
    return args.seed + offset + (1000 * (subset + 1) if args.independent_seeds else 0)


def retrained_losses(trainer: Trainer, masks: torch.Tensor, args: LdsArgs) -> torch.Tensor:
    """``[M, n_query]``: each query's loss after retraining on each subset, the mean over ``retrain_seeds`` seeds."""
    losses = torch.zeros(len(masks), len(trainer.setting.query), dtype=torch.float64)
    with tqdm(total=len(masks) * args.retrain_seeds, desc="retrain on subsets", disable=not args.progress) as bar:
        for row, mask in enumerate(masks):
            for offset in range(args.retrain_seeds):
                losses[row] += trainer.query_losses(
                    trainer.model(mask.nonzero().squeeze(1), subset_seed(args, row, offset))
                )
                bar.update()
    return losses / args.retrain_seeds


def score_methods(args: LdsArgs, setting: Setting, model: nn.Module) -> list[dict[str, Any]]:
    """Pairwise scores ``[n_train, n_query]`` of every method at every damping (``scores``), or why there are none (``error``).

    A method that does not apply (too large a curvature) gets one row, at the default damping. Rows follow ``args.methods``.
    """
    train, query = setting.loader(setting.train), setting.loader(setting.query)
    results = [
        entry
        for damping in sorted({DEFAULT_DAMPING, *args.dampings})
        for entry in _scores_at(args, setting, model, damping, train, query)
    ]
    return sorted(
        results, key=lambda entry: args.methods.index(entry.get("of", entry["method"]))
    )  # stable: per method its rows in damping order, the index rows beside its default damping's


def _scores_at(
    args: LdsArgs, setting: Setting, model: nn.Module, damping: float, train: DataLoader, query: DataLoader
) -> list[dict[str, Any]]:
    """:func:`score_methods`' rows at one damping. The engine lives only here, so one damping's curvature and
    inverses are freed before the next is fitted (two at once ran MiniLM's flattened FIMs out of memory)."""
    default = damping == DEFAULT_DAMPING
    engine, runnable, skipped = fitted_engine(
        args, setting, model, damping, train, lambda m: default or m not in DAMPING_FREE
    )
    results: list[dict[str, Any]] = [
        {"method": m, "damping": damping, "default": True, "error": f"skipped: {reason}"}
        for m, reason in skipped.items()
        if default
    ]
    for method in runnable:
        entry: dict[str, Any] = {
            "method": method,
            "damping": None if method in DAMPING_FREE else damping,
            "default": default,
        }
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():  # recorded in the "converged" column instead
                warnings.simplefilter("ignore", NotConvergedWarning)
                entry["scores"] = engine.pairwise(train, query, method=method)
            entry["seconds"] = time.perf_counter() - start
            flags = [d.converged for d in engine.diagnostics() if d.method == method and d.converged is not None]
            entry["converged"] = all(flags) if flags else None
        except (HyperinfError, torch.linalg.LinAlgError) as error:
            entry["error"] = f"{type(error).__name__}: {error}"
        results.append(entry)
    if default and args.index_dims and args.methods[0] in runnable:
        results += _index_scores(args, engine, args.methods[0], train, query)
    return results


def _index_scores(
    args: LdsArgs, engine: InfluenceEngine, method: str, train: DataLoader, query: DataLoader
) -> list[dict[str, Any]]:
    """``method``'s pairwise scores from a gradient index at each of ``--index-dims`` (built, queried, deleted)."""
    results, kronecker = [], needs_kronecker(method)
    for dim in args.index_dims:
        entry: dict[str, Any] = {
            "method": f"{method} idx{dim}",
            "of": method,
            "damping": None if method in DAMPING_FREE else engine.config.score.damping,
            "default": True,
        }
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as folder:
                index = GradientIndex.build(engine, train, folder, dim=dim, seed=args.seed, kronecker=kronecker)
                entry["scores"] = index.pairwise(engine, query, method=method).double()
            entry["seconds"] = time.perf_counter() - start
        except (HyperinfError, torch.linalg.LinAlgError) as error:
            entry["error"] = f"{type(error).__name__}: {error}"
        results.append(entry)
    return results


def run_lds(args: LdsArgs) -> list[dict[str, Any]]:
    """Train, score, retrain on every subset, then write lds.csv, per_query.csv, arguments.json and lds.png; returns lds.csv's rows."""
    check_args(args)
    setting = SETTINGS[args.setting](args)
    masks = subset_masks(len(setting.train), args.subsets, args.seed)
    trainer = Trainer(args, setting)
    full = trainer.model(torch.arange(len(setting.train)), args.seed)
    full_losses = trainer.query_losses(full)
    scored = score_methods(args, setting, full)
    losses = retrained_losses(trainer, masks, args)
    rows, per_query = [], []
    query_names = [text for text, _ in setting.query]
    for entry in scored:
        row = {k: entry.get(k) for k in ("method", "damping", "default", "converged", "seconds", "error")}
        if "scores" in entry:
            lds = linear_datamodeling_score(entry["scores"], masks, losses)
            row.update(_summary(lds, args))
            per_query += [
                {"method": entry["method"], "damping": entry["damping"], "query": q, "lds": float(v)}
                for q, v in zip(query_names, lds)
            ]
        rows.append({**row, "subsets": args.subsets})
    record = {
        "trainings": {"trained": trainer.trained, "cached": trainer.cached, "seconds": trainer.seconds},
        "query_loss": {"full_model": float(full_losses.mean()), "subset_models": float(losses.mean())},
    }
    write_lds(args, rows, per_query, record)
    print_lds(args, rows, record)
    return rows


def _summary(lds: torch.Tensor, args: LdsArgs) -> dict[str, Any]:
    """Mean LDS over the queries where it is defined, with its bootstrap interval."""
    finite = lds[torch.isfinite(lds)]
    if finite.numel() == 0:
        return {"lds": float("nan"), "low": float("nan"), "high": float("nan"), "n_queries": 0}
    low, high = bootstrap_interval(finite, draws=args.bootstrap_draws, seed=args.seed)
    return {"lds": float(finite.mean()), "low": low, "high": high, "n_queries": finite.numel()}


def best_rows(rows: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """Per method: its row at the default damping and its best-scoring row (``None`` when no damping gave an LDS)."""
    result = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        scored = [r for r in own if _has_lds(r)]
        result[method] = (next(r for r in own if r["default"]), max(scored, key=lambda r: r["lds"]) if scored else None)
    return result


def _has_lds(row: dict[str, Any]) -> bool:
    return row.get("lds") is not None and not math.isnan(row["lds"])


def write_lds(
    args: LdsArgs, rows: list[dict[str, Any]], per_query: list[dict[str, Any]], record: dict[str, Any]
) -> None:
    import pandas as pd

    columns = [
        "method",
        "damping",
        "default",
        "lds",
        "low",
        "high",
        "n_queries",
        "subsets",
        "converged",
        "seconds",
        "error",
    ]
    table = pd.DataFrame(rows).reindex(columns=columns).astype({"n_queries": "Int64"})
    out = args.out_dir
    atomic_write(out / "lds.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(
        out / "per_query.csv",
        lambda tmp: pd.DataFrame(per_query, columns=["method", "damping", "query", "lds"]).to_csv(tmp, index=False),
    )
    write_json(out / "arguments.json", {"args": asdict(args), **record})
    plot_lds(args, rows, out / "lds.png")


def plot_lds(args: LdsArgs, rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of the mean LDS per method, at the default damping and at the best (its damping written above), with the bootstrap intervals."""
    pairs = {m: pair for m, pair in best_rows(rows).items() if pair[1] is not None}
    fig, ax = new_figure(width=max(5.0, 0.9 * len(pairs) + 2))
    for shift, which, label in ((-0.2, 0, "default damping"), (0.2, 1, "best damping")):
        bars = [(i + shift, pair[which]) for i, pair in enumerate(pairs.values()) if _has_lds(pair[which])]
        heights = [r["lds"] for _, r in bars]
        spread = [[r["lds"] - r["low"] for _, r in bars], [r["high"] - r["lds"] for _, r in bars]]
        ax.bar([x for x, _ in bars], heights, width=0.4, yerr=spread, capsize=3, label=label)
        for x, r in bars if which == 1 else ():
            ax.annotate(
                "-" if r["damping"] is None else f"{r['damping']:g}",
                (x, r["high"]),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(pairs)), list(pairs), rotation=30, ha="right")
    ax.set_ylabel("mean LDS over queries (95% bootstrap interval)")
    ax.set_title(f"linear datamodeling score: {args.setting}, {args.subsets} half subsets")
    save_figure(fig, ax, path)


def print_lds(args: LdsArgs, rows: list[dict[str, Any]], record: dict[str, Any]) -> None:
    n_queries = max((r.get("n_queries") or 0 for r in rows), default=0)
    print(
        f"\nLDS on {args.setting}: {args.subsets} half subsets of {args.n_train} examples, {args.retrain_seeds} retraining(s) each "
        f"({'its own seeds' if args.independent_seeds else 'the same seeds for every subset'}), "
        f"{n_queries} queries; mean over queries [95% bootstrap interval] (damping_mode={args.damping_mode})"
    )
    print(f"{'method':<18}{'default damping':>32}{'best damping':>34}")
    for method, (default, best) in best_rows(rows).items():
        if best is None:
            print(f"{method:<18}  {default['error']}")
            continue
        print(f"{method:<18}{_cell(default):>32}{_cell(best):>34}")
    if any(r.get("converged") is False for r in rows):
        print("* the iterative inverse stopped above its tolerance on some block (column converged in lds.csv)")
    trainings = record["trainings"]
    print(
        f"trainings: {trainings['trained']} trained ({trainings['seconds']:.1f} s), {trainings['cached']} loaded from {args.cache_dir}"
    )
    print(f"results written to {args.out_dir}/")


def _cell(row: dict[str, Any]) -> str:
    if not _has_lds(row):
        return "failed (see lds.csv)"
    damping = "-" if row["damping"] is None else f"{row['damping']:g}"
    flag = "*" if row.get("converged") is False else ""
    return f"{row['lds']:.3f} [{row['low']:.3f}, {row['high']:.3f}] @{damping}{flag}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf experiment lds`` options (argparse)."""
    add_options(parser, LdsArgs)


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf experiment lds`` from parsed arguments."""
    run_lds(from_namespace(LdsArgs, ns))
    return 0
