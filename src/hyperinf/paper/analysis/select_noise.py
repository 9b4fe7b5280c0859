"""Do a noisy selection study's rankings put the replaced labels or answer keys last?

    python -m hyperinf.paper.analysis.select_noise RUN_DIR [RUN_DIR ...]

Reads a ``hyperinf experiment select --variant noisy --out RUN_DIR`` run (its arguments.json, its
cached warm-up and pool scores) and prints, per seed, the ROC-AUC of every ranking the study
selected by (each method, the first method's cosine, LESS, the lowest training loss, RDS+) for the
pool examples whose label or answer key the noisy variant replaced: the probability that a replaced
example is ranked after (kept later than) a clean one. 0.5 is a random order, 1 keeps every clean
example before any replaced one. Where ``flipped_kept`` in summary.csv counts the replaced examples
at three cut-offs, this scores the whole order. The first method's per-target turns give an order,
not a score, and are left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hyperinf.app.finetune import trained_path
from hyperinf.errors import DataError
from hyperinf.metrics import roc_auc
from hyperinf.paper.analysis.study_runs import cached_scores, seeded_runs
from hyperinf.paper.select_study import rankings, rds_scores, study_setup


def noise_aucs(run: Path) -> dict[int, dict[str, float]]:
    """``seed -> selector -> ROC-AUC`` of its ranking for the replaced examples of one noisy run folder."""
    args, seeds = seeded_runs(run)
    if args.variant != "noisy":
        raise DataError(
            f"{run} is a {args.variant} run: no label or answer key was replaced (run with --variant noisy)"
        )
    out = {}
    for seeded, record in seeds:
        warm = trained_path(seeded.cache_dir, record["warm_up"]["key"])
        if not seeded.no_warmup and not warm.exists():
            raise DataError(
                f"{run}: seed {seeded.seed}'s warm-up is not in the cache ({warm}): rerun the study's command to make it"
            )
        setup = study_setup(seeded)
        setup.warm_up()  # loads the cached weights RDS+ reads the hidden states of
        scored = cached_scores(run, seeded, setup.split, record)
        similarity = rds_scores(setup.learner, setup.split, seeded.batch_size)
        out[seeded.seed] = {
            name: roc_auc(scores, setup.flipped) for name, scores in rankings(seeded, scored, similarity).items()
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    ns = parser.parse_args()
    for run in ns.runs:
        aucs = noise_aucs(run)
        print(f"{run}: ROC-AUC for the replaced examples (0.5: a random order; 1: all of them ranked last)")
        for seed, cells in aucs.items():
            print(f"  seed {seed}: " + ", ".join(f"{name} {auc:.3f}" for name, auc in cells.items()))
        if len(aucs) > 1:
            selectors = next(iter(aucs.values()))
            means = {
                name: (np.mean([c[name] for c in aucs.values()]), np.std([c[name] for c in aucs.values()]))
                for name in selectors
            }
            print("  mean (std): " + ", ".join(f"{name} {m:.3f} ({s:.3f})" for name, (m, s) in means.items()))


if __name__ == "__main__":
    main()
