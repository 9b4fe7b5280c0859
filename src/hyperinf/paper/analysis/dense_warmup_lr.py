"""Test accuracy of the selection study's warm-up per learning rate, on SmolLM2's dense last block.

    python -m hyperinf.paper.analysis.dense_warmup_lr 1e-3 1e-4 [LR ...]

The warm-up of ``hyperinf experiment select --model smollm2 --dense`` (seed 0: one epoch on the
400-tweet pool, cached like the study's) at each learning rate, and the accuracy of its option
scoring on the study's 200 test tweets, overall and per label (the study's own evaluation, cached with it): whether the dense variant's weak
warm-up comes from the study's one learning rate.
"""

from __future__ import annotations

import sys
import time

from hyperinf.app.finetune import trainable_state
from hyperinf.app.select import make_learner, warm_up
from hyperinf.paper.select_study import Evaluation, StudyArgs, study_split


def main() -> None:
    for lr in [float(x) for x in sys.argv[1:]]:
        args = StudyArgs(model="smollm2", dense=True, lr=lr, damping_mode="gfim", progress=False)
        split = study_split(args)
        learner = make_learner(args, split.pool.label_names)
        start = time.perf_counter()
        warm = warm_up(args, learner, split.pairs("pool"))
        result = Evaluation(args, learner, split, trainable_state(learner.model), warm["key"]).accuracy(warm["key"])
        per_label = ", ".join(f"{name} {result[f'accuracy_{name}']:.3f}" for name in split.test.label_names)
        print(
            f"lr {lr:g}: warm-up test accuracy {result['accuracy']:.3f} ({per_label}; cached {warm['cached']}, {time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
