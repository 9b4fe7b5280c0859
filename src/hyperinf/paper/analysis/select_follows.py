"""What do a selection study's selections follow, label by label?

    python -m hyperinf.paper.analysis.select_follows RUN_DIR [RUN_DIR ...] [--fraction 0.2]

Reads what ``hyperinf experiment select --out RUN_DIR`` wrote (``results.csv``: each seed's
selections and their label shares; ``arguments.json``: the settings, and each seed's warm-up key
and target-set loss share per label) and the pool scores that run cached, and compares each
selector's label shares with two per-label measures:

- ``target loss``: the label's share of the target set's loss under the warm-up model (the labels
  the target's mean gradient leans toward);
- ``pool |g|^2``: the label's share of the pool's summed squared gradient norms (the labels whose
  examples have the largest gradients, which an inner product favours whatever its direction).

With two labels it counts the seeds in which the selection's majority label is the measure's
largest; with more, the Pearson correlation over (seed, label) pairs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from hyperinf.app.select_rows import reads_rows
from hyperinf.errors import DataError
from hyperinf.paper.analysis.study_runs import cached_scores, seeded_runs
from hyperinf.paper.select_study import study_split

SKIPPED = ("random", "exact")  # random has no direction; exact repeats hyperinf's selections
MEASURES = ("target loss", "pool |g|^2")


def label_measures(run: Path) -> dict[int, dict[str, dict[str, float]]]:
    """``seed -> measure -> label -> share``, the pool's gradient norms read from the run's cached scores."""
    args, seeds = seeded_runs(run)
    if reads_rows(args):
        raise DataError(f"{run} is a study of {args.task}'s rows: they have no labels to measure shares of")
    out = {}
    for seeded, record in seeds:
        split = study_split(seeded)
        squared = cached_scores(run, seeded, split, record)["gradient_norm"].double() ** 2
        labels, names = split.pool.labels, split.pool.label_names
        out[record["seed"]] = {
            "target loss": {name: v["loss_share"] for name, v in record["target_loss_by_label"].items()},
            "pool |g|^2": {name: float(squared[labels == i].sum() / squared.sum()) for i, name in enumerate(names)},
        }
    return out


def follows(run: Path, fraction: float) -> dict[str, dict[str, tuple[float, int]]]:
    """``selector -> measure -> (agreements or r, seeds or points)`` for one run folder."""
    results = pd.read_csv(run / "results.csv")
    measures = label_measures(run)
    rows = results[np.isclose(results.fraction, fraction) & ~results.selector.isin(SKIPPED)]
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for selector, group in rows.groupby("selector", sort=False):
        for measure in MEASURES:
            pairs = [
                [(shares[label], row[f"share_{label}"]) for label in shares]
                for row in group.to_dict("records")
                for shares in [measures[row["seed"]][measure]]
            ]
            if len(pairs[0]) == 2:
                agree = sum(max(range(2), key=lambda i: p[i][0]) == max(range(2), key=lambda i: p[i][1]) for p in pairs)
                out.setdefault(selector, {})[measure] = (agree, len(pairs))
            else:
                by, kept = np.array([x for p in pairs for x in p]).T
                out.setdefault(selector, {})[measure] = (float(np.corrcoef(by, kept)[0, 1]), by.size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--fraction", type=float, default=0.2)
    ns = parser.parse_args()
    for run in ns.runs:
        cells = follows(run, ns.fraction)
        two = all(isinstance(v[0], int) for c in cells.values() for v in c.values())
        what = (
            "seeds whose majority label is the measure's largest"
            if two
            else "r(measure share, kept share) over (seed, label) points"
        )
        print(f"{run}: {what}")
        for measure in MEASURES:
            print(
                f"  {measure}: "
                + ", ".join(
                    f"{k} {c[measure][0]}/{c[measure][1]}" if two else f"{k} {c[measure][0]:.2f} ({c[measure][1]})"
                    for k, c in cells.items()
                )
            )


if __name__ == "__main__":
    main()
