"""``hyperinf experiment logo``: leave-one-group-out retraining against every method (paper App. E.2, Table 6).

Per seed: train on the whole (clean) training set, score every training example against the
validation set with each method, rank the examples by score and cut them into ``groups`` equal
parts (most harmful first), retrain without each part and measure the change of the mean
validation loss against the full model, ``LOGO(C) = L(theta_without_C) - L(theta_0)`` (eq. 25). A
method is judged by Spearman's correlation over the parts between their mean scores and the loss
drop ``-LOGO(C)``: under hyperinf's sign (positive = harmful) removing the highest-scored part
should lower the loss the most, so a good method's correlation is positive, the paper's
orientation (its scores are helpfulness: positive correlation with the LOGO score itself).

Settings, training and the cache are those of ``hyperinf experiment lds``
(:mod:`hyperinf.paper.retraining`): every training is cached under a key of the setting, the
schedule, the seed and the kept examples in order, so parts of different methods that hold the same
examples share one retraining, and a rerun retrains nothing.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from hyperinf.app.arguments import InfluenceOptions, add_options, from_namespace, option, override
from hyperinf.app.report import new_figure, save_figure
from hyperinf.errors import DataError
from hyperinf.metrics import spearman
from hyperinf.paper.retraining import SETTINGS, RetrainArgs, Trainer, check_retrain_args, fitted_engine
from hyperinf.results import atomic_write, write_json

LOGO_METHODS = ("hyperinf", "datainf", "lissa", "tracin", "exact")

# Quoted from ../shared/reference/hyperinf-paper.txt (App. E.2): six GLUE tasks, LoRA, K = 5 groups.
PAPER_TABLE_6 = """\
Method (<i>LoRA</i>)	DATAINF	LISSA	TRACIN	HYPERINF
COLA	0.50	0.49	-0.99	0.70
MRPC	0.0	0.0	0.0	0.20
QNLI	-0.40	-0.30	-0.60	0.10
QQP	0.30	0.49	-0.30	0.70
RTE	0.60	0.60	0.40	1.00
SST2	-0.90	-0.30	-0.10	0.70
"""


def paper_table_6() -> dict[str, dict[str, str]]:
    """The paper's Table 6 as ``{method: {task: value}}``, values as the text writes them."""
    header, *rows = [line.split("\t") for line in PAPER_TABLE_6.splitlines()]
    return {method.lower(): {row[0]: row[column] for row in rows} for column, method in enumerate(header) if column > 0}


@dataclass
class LogoArgs(RetrainArgs):
    """Settings of ``hyperinf experiment logo``; the query set (``n_query``, ``--n-val``) is the validation set."""

    experiment: ClassVar[str] = "logo"
    setting: str = override(RetrainArgs, "setting", default="tweets")
    methods: tuple[str, ...] = override(RetrainArgs, "methods", default=LOGO_METHODS)
    n_train: int = override(RetrainArgs, "n_train", default=500)
    n_query: int = override(
        RetrainArgs, "n_query", flag="--n-val", help="held-out validation examples (default: %(default)s)"
    )
    seed: int = override(RetrainArgs, "seed", help="first seed (default: %(default)s)")
    out: Path | None = override(RetrainArgs, "out", help="output folder (default: runs/logo-<setting>)")
    groups: int = option(5, help="groups K the ranked training set is cut into (default: %(default)s)")
    seeds: int = option(3, help="seeds, each its own split, model and groups; mean ± std (default: %(default)s)")
    damping: float = override(InfluenceOptions, "damping", help="damping factor of every method (default: %(default)s)")


def check_args(args: LogoArgs) -> None:
    """Refuse settings the experiment cannot run with, before any data is read or model trained."""
    check_retrain_args(args)
    if not 2 <= args.groups <= args.n_train:
        raise DataError(
            f"--groups {args.groups} with --n-train {args.n_train}: a rank correlation over groups needs at least 2 of them, "
            "and each group at least one training example; pick 2 <= --groups <= --n-train (the paper uses 5)"
        )
    if args.seeds < 1:
        raise DataError(f"--seeds must be at least 1, got {args.seeds}")
    if args.damping <= 0:
        raise DataError(f"--damping must be positive, got {args.damping}")


def logo_groups(scores: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The training indices ranked by score, highest (most harmful) first, cut into ``groups`` parts of equal size (±1)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return list(torch.tensor_split(order, groups))


def logo_correlation(mean_scores: torch.Tensor, loss_changes: torch.Tensor) -> float:
    """Spearman's correlation of the groups' mean scores with the loss drop when each is removed (positive: a good method)."""
    return float(spearman(mean_scores.double(), -loss_changes.double()))


def run_seed(args: LogoArgs) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One seed: train on everything, score, retrain without each group of each method; the groups' rows and a record."""
    setting = SETTINGS[args.setting](args)
    trainer = Trainer(args, setting)
    n = len(setting.train)
    full = trainer.model(torch.arange(n), args.seed)
    full_loss = float(trainer.query_losses(full).mean())
    train = setting.loader(setting.train)
    engine, runnable, skipped = fitted_engine(args, setting, full, args.damping, train)
    if not runnable:
        raise DataError(
            f"no method of --methods applies to the {args.setting} setting ({'; '.join(f'{m}: {why}' for m, why in skipped.items())}): pick others"
        )
    scored = engine.score_methods(train, setting.loader(setting.query), runnable)
    rows = []
    for method, scores in scored.items():
        for rank, members in enumerate(logo_groups(scores, args.groups), start=1):
            kept = torch.ones(n, dtype=torch.bool)
            kept[members] = False
            loss = float(trainer.query_losses(trainer.model(kept.nonzero().squeeze(1), args.seed)).mean())
            rows.append(
                {
                    "seed": args.seed,
                    "method": method,
                    "group": rank,
                    "size": members.numel(),
                    "mean_score": float(scores[members].mean()),
                    "val_loss": loss,
                    "loss_change": loss - full_loss,
                }
            )
    record = {
        "seed": args.seed,
        "full_val_loss": full_loss,
        "skipped": skipped,
        "trainings": {"trained": trainer.trained, "cached": trainer.cached, "seconds": trainer.seconds},
    }
    return rows, record


def summarize(args: LogoArgs, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (in ``args.methods`` order): the correlation of every seed, their mean and standard deviation."""
    summary = []
    for method in [m for m in args.methods if any(r["method"] == m for r in rows)]:
        per_seed = []
        for seed in dict.fromkeys(r["seed"] for r in rows):
            own = [r for r in rows if r["method"] == method and r["seed"] == seed]
            per_seed.append(
                logo_correlation(
                    torch.tensor([r["mean_score"] for r in own]), torch.tensor([r["loss_change"] for r in own])
                )
            )
        values = torch.tensor(per_seed, dtype=torch.float64)
        finite = values[torch.isfinite(values)]
        summary.append(
            {
                "method": method,
                "spearman": float(finite.mean()) if finite.numel() else math.nan,
                "spearman_std": float(finite.std()) if finite.numel() > 1 else 0.0,
                "seeds": finite.numel(),
                "per_seed": per_seed,
            }
        )
    return summary


def run_logo(args: LogoArgs) -> list[dict[str, Any]]:
    """Every seed; writes groups.csv, logo.csv, arguments.json and logo.png, prints the table; returns logo.csv's rows."""
    check_args(args)
    rows, records = [], []
    for offset in range(args.seeds):
        seed_rows, record = run_seed(replace(args, seed=args.seed + offset))
        rows += seed_rows
        records.append(record)
    summary = summarize(args, rows)
    write_logo(args, rows, summary, records)
    print_logo(args, rows, summary, records)
    return summary


def write_logo(
    args: LogoArgs, rows: list[dict[str, Any]], summary: list[dict[str, Any]], records: list[dict[str, Any]]
) -> None:
    import pandas as pd

    out = args.out_dir
    atomic_write(out / "groups.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    table = pd.DataFrame([{k: v for k, v in entry.items() if k != "per_seed"} for entry in summary])
    atomic_write(out / "logo.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_json(
        out / "arguments.json",
        {"args": asdict(args), "seeds": records, "summary": summary, "paper_table_6": paper_table_6()},
    )
    plot_logo(args, rows, summary, out / "logo.png")


def mean_changes(rows: list[dict[str, Any]], method: str) -> list[float]:
    """Per group (most harmful first), the validation-loss change after removing it, the mean over seeds."""
    groups = sorted({r["group"] for r in rows if r["method"] == method})
    return [
        float(torch.tensor([r["loss_change"] for r in rows if r["method"] == method and r["group"] == g]).mean())
        for g in groups
    ]


def plot_logo(args: LogoArgs, rows: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> None:
    """The validation-loss change after removing each group, most harmful first, one line per method (mean over seeds)."""
    fig, ax = new_figure()
    for entry in summary:
        changes = mean_changes(rows, entry["method"])
        style = (
            {"linestyle": ":", "linewidth": 2.5} if entry["method"].startswith("exact") else {}
        )  # it usually lies on hyperinf
        ax.plot(
            range(1, len(changes) + 1),
            changes,
            marker="o",
            label=f"{entry['method']} (rho {entry['spearman']:.2f})",
            **style,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(1, args.groups + 1))
    ax.set_xlabel("group removed (1 = highest scores, most harmful)")
    ax.set_ylabel("change of the mean validation loss")
    ax.set_title(f"leave one group out: {args.setting}, {args.groups} groups of {args.n_train} examples")
    save_figure(fig, ax, path)


def print_logo(
    args: LogoArgs, rows: list[dict[str, Any]], summary: list[dict[str, Any]], records: list[dict[str, Any]]
) -> None:
    paper = paper_table_6()
    tasks = "/".join(next(iter(paper.values())))
    print(
        f"\nleave one group out on {args.setting}: {args.groups} groups of {args.n_train} training examples, {args.n_query} validation "
        f"examples, {len(records)} seed(s); Spearman of the groups' mean scores with the validation-loss drop when each is removed"
    )
    print(
        f"{'method':<12}{'Spearman':>16}   {'loss change per group, most harmful first':<44}paper Table 6 ({tasks}, GLUE)"
    )
    for entry in summary:
        spread = f" ± {entry['spearman_std']:.2f}" if len(records) > 1 else ""
        changes = " ".join(f"{c:+.4f}" for c in mean_changes(rows, entry["method"]))
        theirs = "/".join(paper[entry["method"]].values()) if entry["method"] in paper else "-"
        print(f"{entry['method']:<12}{entry['spearman']:>9.2f}{spread:<7}   {changes:<44}{theirs}")
    for method, why in records[0]["skipped"].items():
        print(f"skipped {method}: {why}")
    trained = sum(r["trainings"]["trained"] for r in records)
    cached = sum(r["trainings"]["cached"] for r in records)
    seconds = sum(r["trainings"]["seconds"] for r in records)
    print(
        f"trainings: {trained} trained ({seconds:.1f} s), {cached} loaded from {args.cache_dir}; results written to {args.out_dir}/"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf experiment logo`` options (argparse)."""
    add_options(parser, LogoArgs)


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf experiment logo`` from parsed arguments."""
    run_logo(from_namespace(LogoArgs, ns))
    return 0
