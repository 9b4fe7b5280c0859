"""The paper's Table 3 (LoRA) / Table 4 (dense) layout from several selection studies.

    python -m hyperinf.paper.analysis.select_paper_tables [--dense] [--selectors A,B,...] "NAME=RUN_DIR" ...

Each RUN_DIR is the ``--out`` of one ``hyperinf experiment select`` run (its ``summary.csv``).
Prints one markdown table: per run and fraction k, random's accuracy and each method's, in
percent, with the change over random in brackets (the paper's arrows), the best cell bold, the
full pool as the 100% row, and a last row with each method's mean change over random per k
(the paper's "Average" rows). ``--dense`` adds EK-FAC, as the paper's Table 4 does; ``--selectors``
names the columns instead (e.g. ``hyperinf,hyperinf per-target,less,RDS+``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

FRACTIONS = (0.05, 0.2, 0.4)
LORA_METHODS = ("datainf", "lissa", "tracin", "hyperinf")
DENSE_METHODS = ("datainf", "lissa", "tracin", "ekfac", "hyperinf")


def run_rows(
    name: str,
    summary: pd.DataFrame,
    methods: tuple[str, ...],
    gains: dict[str, dict[float, list[float]]],
    metric: str = "accuracy",
) -> list[str]:
    """The table rows of one run; appends each method's change over random to ``gains``."""
    accuracy = {
        (selector, round(fraction, 4)): 100 * value
        for selector, fraction, value in zip(summary.selector, summary.fraction, summary[metric])
    }
    lines = []
    for k in FRACTIONS:
        random = accuracy[("random", k)]
        values = {m: accuracy.get((m, k)) for m in methods}
        best = max([random, *(v for v in values.values() if v is not None)])
        cells = [f"**{random:.1f}**" if random == best else f"{random:.1f}"]
        for m, v in values.items():
            if v is None:
                cells.append("-")
                continue
            gains[m].setdefault(k, []).append(v - random)
            text = f"{v:.1f} ({v - random:+.1f})"
            cells.append(f"**{text}**" if v == best else text)
        label = f"{name} ({int(summary.seeds.iloc[0])})" if k == FRACTIONS[0] else ""
        lines.append(f"| {label} | {k:.0%} | " + " | ".join(cells) + " |")
    lines.append(f"| | 100% | {accuracy[('full pool', 1.0)]:.1f} |" + " |" * len(methods))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument("--dense", action="store_true", help="add EK-FAC's column (Table 4)")
    parser.add_argument("--selectors", help="comma-separated selectors to show instead of the paper's methods")
    parser.add_argument(
        "--metric", default="accuracy", help="summary column (default: accuracy; accuracy_norm: acc_norm)"
    )
    ns = parser.parse_args()
    if ns.selectors and ns.dense:
        parser.error("--dense picks the paper's dense columns; --selectors names them: pass one")
    methods = tuple(ns.selectors.split(",")) if ns.selectors else DENSE_METHODS if ns.dense else LORA_METHODS
    gains: dict[str, dict[float, list[float]]] = {m: {} for m in methods}
    print("| run (seeds) | k | random | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for run in ns.runs:
        name, _, folder = run.partition("=")
        for line in run_rows(name, pd.read_csv(Path(folder) / "summary.csv"), methods, gains, ns.metric):
            print(line)
    means = [" / ".join(f"{sum(v) / len(v):+.1f}" for _, v in sorted(gains[m].items())) for m in methods]
    print("| mean change over random | 5 / 20 / 40% | | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main()
