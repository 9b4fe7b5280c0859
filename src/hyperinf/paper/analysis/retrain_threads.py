"""Does a mislabel adapter retrain to the same weights on another thread count?

    OMP_NUM_THREADS=1 python -m hyperinf.paper.analysis.retrain_threads [--seed 1] [--task tweets]
    OMP_NUM_THREADS=2 python -m hyperinf.paper.analysis.retrain_threads [--seed 1] [--task tweets]

Trains ``hyperinf mislabel``'s adapter for one seed (its default settings) into an empty,
temporary cache and prints the clean test accuracy and a checksum of the trained weights (the sum
of their absolute values). Two runs on the same thread count print the same line; on two thread
counts torch adds its reductions in another order and the weights differ a little. The adapter
cache key does not hold the thread count, so a cached adapter is the first training's.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from hyperinf.app import mislabel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--task", default="tweets")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        args = dataclasses.replace(
            mislabel.MislabelArgs(), task=ns.task, seed=ns.seed, cache_dir=Path(cache), progress=False
        )
        seed = mislabel.trained_seed(args, mislabel.load_task(args))
        predicted = mislabel.predict(seed.model, seed.loader(seed.split.test))
        accuracy = float((predicted == seed.split.test.labels).double().mean())
        checksum = sum(float(p.detach().double().abs().sum()) for p in seed.model.parameters() if p.requires_grad)
    print(
        f"threads {torch.get_num_threads()}, {ns.task} seed {ns.seed}: clean test accuracy {accuracy:.3f}, "
        f"weight checksum {checksum:.10f}, trained in {seed.training['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
