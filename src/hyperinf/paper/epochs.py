"""``hyperinf experiment epochs``: does training longer (memorising the flipped labels) hide them from influence?

Runs the mislabel-detection pipeline (:func:`hyperinf.app.mislabel.run_mislabel`: MiniLM +
rsLoRA on tweets with 20% of the training labels flipped) once per entry of ``--epochs-list``,
each its own cached adapter and output folder ``<out>/epochs-<E>``, and collects every method's
ROC-AUC beside those of the references (each example's training loss, self-influence) per epoch
count. A model that has memorised its training set fits the flipped labels too, so the training
loss stops telling them apart; the question is whether the influence scores still do.

The default training set is 1000 examples, half of ``hyperinf mislabel``'s: the whole default
sweep trains 44 epochs, so it halves the sweep's cost.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hyperinf.app.arguments import add_options, check_methods, from_namespace, int_list, option
from hyperinf.app.mislabel import MislabelArgs, run_mislabel
from hyperinf.app.report import new_figure, save_figure
from hyperinf.errors import DataError
from hyperinf.results import atomic_write, write_json

EPOCHS_TRAIN = 1000  # training examples: see the module's docstring
LEFT_OUT = ("random",)  # references whose ROC-AUC does not depend on the training
MISLABEL_DEFAULTS: dict[str, Any] = {
    "n_train": EPOCHS_TRAIN,
    "out": Path("runs/epochs"),
}  # those of mislabel it changes


@dataclass
class EpochsArgs:
    """Settings of ``hyperinf experiment epochs``: one mislabel run per entry of ``epochs_list`` (its epochs replaced)."""

    mislabel: MislabelArgs = field(default_factory=lambda: MislabelArgs(**MISLABEL_DEFAULTS))
    epochs_list: tuple[int, ...] = option(
        (1, 3, 10, 30),
        parse=int_list,
        help="comma-separated epoch counts, one trained adapter each (default: %(default)s)",
    )
    seeds: int = option(1, help="number of seeds per epoch count; the table reports mean ± std (default: %(default)s)")

    @property
    def out(self) -> Path:
        return self.mislabel.out

    def run_args(self, epochs: int) -> MislabelArgs:
        """The mislabel run of ``epochs`` epochs, written to ``<out>/epochs-<epochs>``."""
        return replace(self.mislabel, epochs=epochs, out=self.out / f"epochs-{epochs}")


def check_args(args: EpochsArgs) -> None:
    """Refuse settings the study cannot run with, before any data is read or model trained."""
    if not args.epochs_list or min(args.epochs_list) < 1 or len(set(args.epochs_list)) != len(args.epochs_list):
        raise DataError(
            f"--epochs-list must be distinct epoch counts of at least 1, e.g. 1,3,10,30; got {','.join(map(str, args.epochs_list)) or '(none)'}"
        )
    if args.seeds < 1:
        raise DataError(f"--seeds must be at least 1, got {args.seeds}")
    check_methods(args.mislabel.methods)


def run_epochs(args: EpochsArgs) -> list[dict[str, Any]]:
    """Every epoch count; writes epochs.csv, epochs.png and arguments.json, prints the table; returns epochs.csv's rows."""
    check_args(args)
    rows = []
    for epochs in sorted(args.epochs_list):
        summary = run_mislabel(args.run_args(epochs), seeds=args.seeds)
        rows += [
            {
                "epochs": epochs,
                "method": e["method"],
                "roc_auc": e["roc_auc"],
                "roc_auc_std": e["roc_auc_std"],
                "seeds": e["seeds"],
            }
            for e in summary
            if e["method"] not in LEFT_OUT
        ]
    write_epochs(args, rows)
    print_epochs(args, rows)
    return rows


def write_epochs(args: EpochsArgs, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    atomic_write(args.out / "epochs.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    runs = {epochs: str(args.run_args(epochs).out) for epochs in sorted(args.epochs_list)}
    write_json(args.out / "arguments.json", {"args": asdict(args), "runs": runs})
    plot_epochs(args, rows, args.out / "epochs.png")


def plot_epochs(args: EpochsArgs, rows: list[dict[str, Any]], path: Path) -> None:
    """ROC-AUC of finding the flipped labels against the training epochs (log scale), one line per method and reference."""
    fig, ax = new_figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        style = {"linestyle": "--"} if method not in args.mislabel.methods else {}
        ax.errorbar(
            [r["epochs"] for r in own],
            [r["roc_auc"] for r in own],
            yerr=[r["roc_auc_std"] for r in own],
            marker="o",
            capsize=3,
            label=method,
            **style,
        )
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(sorted(args.epochs_list), [str(e) for e in sorted(args.epochs_list)])
    ax.minorticks_off()
    ax.set_xlabel("training epochs")
    ax.set_ylabel("ROC-AUC of finding the flipped labels")
    m = args.mislabel
    ax.set_title(f"memorisation: {m.model} r={m.rank}, {m.task}, {m.n_train} examples, {m.flip_fraction:.0%} flipped")
    save_figure(fig, ax, path)


def print_epochs(args: EpochsArgs, rows: list[dict[str, Any]]) -> None:
    epochs = sorted(args.epochs_list)
    spread = args.seeds > 1
    width = 16 if spread else 9
    print(
        f"\nROC-AUC of finding the flipped labels per training epochs ({args.seeds} seed(s){', mean ± std' if spread else ''})"
    )
    print(f"{'method':<16}" + "".join(f"{f'{e} ep':>{width}}" for e in epochs))
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["epochs"]: r for r in rows if r["method"] == method}
        text = [f"{cells[e]['roc_auc']:.3f}" + (f" ± {cells[e]['roc_auc_std']:.3f}" if spread else "") for e in epochs]
        print(f"{method:<16}" + "".join(f"{t:>{width}}" for t in text))
    print(f"results written to {args.out}/ (each run's own in epochs-<E>/)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf experiment epochs`` options: ``hyperinf mislabel``'s but ``--epochs``, and the sweep's."""
    add_options(parser, MislabelArgs, skip=("epochs", "adapter"), **MISLABEL_DEFAULTS)
    add_options(parser, EpochsArgs)


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf experiment epochs`` from parsed arguments."""
    run_epochs(from_namespace(EpochsArgs, ns, mislabel=from_namespace(MislabelArgs, ns)))
    return 0
