"""Do a selection study's selections follow the warm-up's target loss by label?

    python benchmarks/select_target_loss.py RUN_DIR [RUN_DIR ...] [--fraction 0.2]

Reads what ``hyperinf experiment select --out RUN_DIR`` wrote (``results.csv``: each seed's
selections and their label shares; ``arguments.json``: each seed's target-set loss share per
label under the warm-up model) and prints, per selector:

- with two labels, in how many seeds the selection's majority label is the label that carries
  most of the target loss;
- with more labels, the Pearson correlation over (seed, label) between a label's share of the
  target loss and its share of the selection.

A selector that follows the target loss spends its budget on the labels the warm-up gets wrong
on the target set, and training on that selection alone forgets the other labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

SKIPPED = ("random", "exact")  # random has no direction; exact repeats hyperinf's selections


def follows(run: Path, fraction: float) -> dict[str, tuple[float, float]]:
    """``selector -> (agreements or r, seeds or points)`` for one run folder."""
    results = pd.read_csv(run / "results.csv")
    target = {r["seed"]: r["target_loss_by_label"] for r in json.loads((run / "arguments.json").read_text())["seeds"]}
    rows = results[np.isclose(results.fraction, fraction) & ~results.selector.isin(SKIPPED)]
    out = {}
    for selector, group in rows.groupby("selector", sort=False):
        pairs = [
            [(shares[label]["loss_share"], row[f"share_{label}"]) for label in shares]
            for row in group.to_dict("records") for shares in [target[row["seed"]]]
        ]  # fmt: skip
        if len(pairs[0]) == 2:
            agree = sum(max(range(2), key=lambda i: p[i][0]) == max(range(2), key=lambda i: p[i][1]) for p in pairs)
            out[selector] = (agree, len(pairs))
        else:
            loss, kept = np.array([x for p in pairs for x in p]).T
            out[selector] = (float(np.corrcoef(loss, kept)[0, 1]), loss.size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--fraction", type=float, default=0.2)
    ns = parser.parse_args()
    for run in ns.runs:
        cells = follows(run, ns.fraction)
        two = all(isinstance(v[0], int) for v in cells.values())
        what = "majority label = most target loss, seeds" if two else "r(target loss share, kept share), points"
        print(f"{run}: {what}: " + ", ".join(f"{k} {a}/{n}" if two else f"{k} {a:.2f} ({n})" for k, (a, n) in cells.items()))


if __name__ == "__main__":
    main()
