"""Influence across processes with ``torch.distributed`` (e.g. ``torchrun``): each process reads a shard.

With ``InfluenceEngine(..., distributed=True)`` every sum the engine takes over data — the curvature
of ``fit``, the validation gradient, DataInf's pass over the training gradients — is all-reduced,
so every process holds what one process would have computed over the whole data set. Each process
then scores its own shard of the training set, and :func:`gather` puts the shards' scores back in
data-set order. The sums are plain tensors: one ``all_reduce`` per pass, any backend (``gloo`` on
CPU, ``nccl`` on GPUs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from hyperinf.errors import EmptyDataError


def require_initialized() -> None:
    """Raise a clear error when ``distributed=True`` is used outside an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group: launch with torchrun "
            "and call torch.distributed.init_process_group() first (backend 'gloo' on CPU, 'nccl' on GPUs)."
        )


def shard(dataset: Dataset[Any], *, rank: int | None = None, world_size: int | None = None) -> Subset[Any]:
    """This process's contiguous share of ``dataset`` (sizes differ by at most one).

    Contiguous, not strided like ``DistributedSampler``: concatenating the shards in rank order
    gives the data set's order back, which is what :func:`gather` does with their scores.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    n = len(dataset)  # type: ignore[arg-type]
    if n < world_size:
        raise EmptyDataError(
            f"{n} examples cannot be shared by {world_size} processes: every process needs at least one."
        )
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return Subset(dataset, range(start, stop))


def reducer(enabled: bool) -> Callable[[list[torch.Tensor], int], int]:
    """A function that sums tensors in place over processes and returns the total of a count (as is when not ``enabled``)."""

    def reduce(tensors: list[torch.Tensor], count: int) -> int:
        if not enabled:
            return count
        total = torch.tensor(count, dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
        all_reduce_sum([*tensors, total])
        return int(total)

    return reduce


def per_process(path: str | Path, enabled: bool) -> Path:
    """``path`` itself on one process; ``<path>.rank<r>`` per process when distributed (each writes its own)."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{dist.get_rank()}") if enabled else path


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place."""
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def gather(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``local`` (same shape but the first dimension) in rank order."""
    sizes = [torch.zeros((), dtype=torch.int64, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(local.shape[0], device=local.device))
    longest = int(max(sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[: int(size)] for piece, size in zip(pieces, sizes)])
