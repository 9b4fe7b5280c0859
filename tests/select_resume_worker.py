"""Run by test_select_resume.py in a subprocess: `hyperinf select` on a tiny BERT, killed by SIGKILL part way.

Usage: python tests/select_resume_worker.py DATA_FILE FOLDER KILL_AT   (KILL_AT = 0: never killed)
KILL_AT = loss:N kills at the N-th loss call of the scoring (the warm-up's calls are not counted),
read:N at the N-th batch read back from the spilled gradients (pass 2 computes no loss), warmup:N at
the N-th training step of the warm-up (checkpointed every 10 steps here).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

from hyperinf.app import finetune, select
from hyperinf.app.select import SelectArgs, run_select
from hyperinf.spill import GradientSpill


def args_for(data_file: Path, folder: Path) -> SelectArgs:
    return SelectArgs(
        task=str(data_file),
        n_pool=40,
        n_target=10,
        model="tiny-bert",
        rank=2,
        epochs=1,
        lr=5e-3,
        batch_size=1,
        max_length=32,
        out=folder / "out",
        cache_dir=folder / "cache" / "adapters",
        progress=False,
        cache_gib=1e-6,  # a few KiB in memory: the pool's gradients spill to disk
    )


def killer(at: int):
    """A counter that kills this process with SIGKILL on its ``at``-th call (never for 0)."""
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1
        if calls == at:
            os.kill(os.getpid(), signal.SIGKILL)

    return count


def main(data_file: Path, folder: Path, kill_at: str) -> None:
    finetune.CHECKPOINT_STEPS = 10
    where, _, at = kill_at.partition(":")
    count = killer(int(at or 0))
    if where in ("loss", "warmup"):  # the scoring's or the warm-up's loss calls
        name = "score_pool" if where == "loss" else "warm_up"
        real = getattr(select, name)

        def counting_losses(args, learner, *rest):
            def loss(model, batch):
                count()
                return learner.loss(model, batch)

            return real(args, dataclasses.replace(learner, loss=loss), *rest)

        setattr(select, name, counting_losses)
    elif where == "read":
        real_read = GradientSpill.read

        def read_counting_batches(self, skip=0):
            for batch in real_read(self, skip):
                count()
                yield batch

        GradientSpill.read = read_counting_batches
    run_select(args_for(data_file, folder))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
