"""Run by ``torchrun`` from test_distributed.py: each process indexes its shard of the training set (with the
projected Kronecker factors).

Usage: torchrun --nproc-per-node N tests/index_worker.py FOLDER DIM
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from distributed_problem import OPTIONS, loss_fn, problem  # this script's folder is on sys.path
from torch.utils.data import DataLoader

from hyperinf import InfluenceEngine
from hyperinf.distributed import shard
from hyperinf.index import GradientIndex


def main(folder: str, dim: int) -> None:
    dist.init_process_group("gloo")
    model, train, _ = problem()
    engine = InfluenceEngine(model, loss_fn, distributed=True, **OPTIONS)
    loader = DataLoader(shard(train), batch_size=7)
    index = GradientIndex.build(engine, loader, folder, dim=dim, storage="float32", chunk_batches=1, kronecker=True)
    if len(index) != len(train):  # every process gets the whole index back, not its shard
        raise SystemExit(f"rank {dist.get_rank()} got {len(index)} rows of {len(train)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
