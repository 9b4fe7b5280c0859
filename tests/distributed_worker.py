"""Run by ``torchrun`` from test_distributed.py: score with every method on this process's shard.

Every process scores its shard of the training set against the validation set (sharded too) and,
with ``pairwise``, against the whole query set (the validation set, unsharded); rank 0 saves the
gathered results.

Usage: torchrun --nproc-per-node N tests/distributed_worker.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from distributed_problem import (  # this script's folder is on sys.path
    METHODS,
    OPTIONS,
    loss_fn,
    problem,
)
from torch.utils.data import DataLoader

from hyperinf import InfluenceEngine
from hyperinf.distributed import gather, shard


def main(out: str) -> None:
    dist.init_process_group("gloo")
    model, train, val = problem()
    train_loader = DataLoader(shard(train), batch_size=7)
    val_loader = DataLoader(shard(val), batch_size=5)
    engine = InfluenceEngine(model, loss_fn, distributed=True, **OPTIONS)
    engine.fit(train_loader, methods=METHODS)
    scores = engine.score_methods(train_loader, val_loader, METHODS, self_influence="exact")
    result = {method: gather(s) for method, s in scores.items()}
    result["self-influence"] = gather(scores.self_influence)
    result["train_loss"] = gather(scores.train_loss)
    queries = DataLoader(val, batch_size=5)
    for method in METHODS:
        result[f"pairwise/{method}"] = gather(engine.pairwise(train_loader, queries, method=method, query_chunk=4))
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
