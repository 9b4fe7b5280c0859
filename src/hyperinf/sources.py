"""The training-gradient source: per-sample gradients over a loader, kept from pass 1 for pass 2 while they fit.

:class:`GradientStream` turns a loader into :class:`~hyperinf.gradients.BatchGradients` (model in
eval mode, batches moved to the model's device, a progress bar, a clear error for empty data).
:class:`TrainingGradients` records pass 1's gradients while their size stays within a budget and
replays them in pass 2; past the budget, or for another loader, it recomputes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from hyperinf.batches import to_device
from hyperinf.errors import DataOrderError, EmptyDataError
from hyperinf.gradients import BatchGradients, PerSampleGradients
from hyperinf.preconditioners import Reduce


class GradientStream:
    """Per-sample gradients of every batch of a loader, in loader order."""

    def __init__(self, gradients: PerSampleGradients, device: torch.device, *, progress: bool) -> None:
        self.gradients = gradients
        self.device = device
        self.progress = progress

    def __call__(
        self, loader: Iterable[Any], what: str, *, allow_empty: bool = False, skip: int = 0
    ) -> Iterator[tuple[Any, BatchGradients]]:
        """``(batch, gradients)`` per batch after the first ``skip``; ``what`` names the loader in errors and the progress bar."""
        seen = 0
        for index, batch in self.batches(loader, f"gradients: {what}", skip=skip):
            grads = self.gradients(batch, batch_index=index)
            seen += grads.batch_size
            yield batch, grads
        if seen == 0 and not (allow_empty or skip):
            raise EmptyDataError(f"{what} yielded no examples: pass a loader over at least one example.")

    def batches(self, loader: Iterable[Any], desc: str, *, skip: int = 0) -> Iterator[tuple[int, Any]]:
        """``(index, batch)`` on the model's device, with the model in eval mode and a progress bar; the first
        ``skip`` batches (done by a run that was interrupted) are read past without being moved or computed."""
        with eval_mode(self.gradients.model):
            for index, batch in enumerate(tqdm(loader, desc=desc, disable=not self.progress, leave=False)):
                if index >= skip:
                    yield index, to_device(batch, self.device)


class TrainingGradients:
    """Pass 1 records the training gradients (up to ``budget_bytes``); pass 2 replays or recomputes them."""

    def __init__(self, stream: GradientStream, budget_bytes: int) -> None:
        self.stream = stream
        self.budget_bytes = budget_bytes
        self.fit_loader: Iterable[Any] | None = None
        self.gradient_bytes = 0  # size of all per-sample training gradients of the fit
        self._cache: list[BatchGradients] | None = None

    @property
    def cached(self) -> bool:
        """Whether the fit's gradients were kept (they fit the budget)."""
        return self._cache is not None

    def record(self, loader: Iterable[Any], *, allow_empty: bool = False, skip: int = 0) -> Iterator[tuple[Any, BatchGradients]]:
        """Pass 1 over ``loader`` (after ``skip`` batches): yield every batch with its gradients and keep them
        while they fit (not on a resumed pass, whose first batches are not in memory)."""
        check_order(loader, "train_loader")
        check_reiterable(loader, "train_loader")
        cache: list[BatchGradients] | None = [] if not skip else None
        total = 0
        for batch, grads in self.stream(loader, "train_loader", allow_empty=allow_empty, skip=skip):
            total += sum(g.numel() * g.element_size() for g in grads.grads.values())
            if cache is not None and total <= self.budget_bytes:
                cache.append(BatchGradients(grads.losses, grads.grads))  # not pass 1's token factors
            else:
                cache = None  # over budget: pass 2 recomputes the gradients
            yield batch, grads
        self.fit_loader, self.gradient_bytes, self._cache = loader, total, cache

    def forget(self, loader: Iterable[Any] | None = None) -> None:
        """Drop the cache; ``loader`` (if given) is the training data of a fit loaded from disk."""
        self.fit_loader, self.gradient_bytes, self._cache = loader, 0, None

    def holds(self, loader: Iterable[Any]) -> bool:
        """Whether the cache holds ``loader``'s gradients (it is the fit's loader, and they fit the budget)."""
        return self._cache is not None and loader is self.fit_loader

    def __call__(self, loader: Iterable[Any], *, skip: int = 0) -> Iterator[BatchGradients]:
        """The per-sample gradients of ``loader`` after ``skip`` batches: from the cache when it holds this loader, else recomputed."""
        if self.holds(loader):
            yield from self._cache[skip:]
            return
        check_order(loader, "train_loader")
        for _, grads in self.stream(loader, "train_loader", skip=skip):
            yield grads


def mean_gradient(
    stream: GradientStream, loader: Iterable[Any], what: str, *, dtype: torch.dtype, reduce: Reduce, allow_empty: bool = False
) -> dict[str, torch.Tensor]:
    """The mean per-block gradient ``v_l`` over a loader; ``reduce`` sums over processes (distributed runs)."""
    blocks = stream.gradients.blocks
    total = {b.name: torch.zeros(b.shape, dtype=dtype, device=b.module.weight.device) for b in blocks}
    count = 0
    for _, batch in stream(loader, what, allow_empty=allow_empty):
        count += batch.batch_size
        for name, g in batch.grads.items():
            total[name] += g.sum(0)
    count = reduce(list(total.values()), count)
    if count == 0:
        raise EmptyDataError(f"{what} yielded no examples: pass a loader over at least one example.")
    return {name: t / count for name, t in total.items()}


def check_order(loader: Iterable[Any], what: str) -> None:
    """Scores come back in loader order: refuse a loader that shuffles (plain or distributed sampler)."""
    sampler = loader.sampler if isinstance(loader, DataLoader) else None
    if isinstance(sampler, RandomSampler) or (isinstance(sampler, DistributedSampler) and sampler.shuffle):
        raise DataOrderError(
            f"{what} shuffles its data: scores are returned in loader order, so use shuffle=False "
            "(for a DistributedSampler, DistributedSampler(..., shuffle=False), or hyperinf.distributed.shard)."
        )


def check_reiterable(loader: Iterable[Any], what: str) -> None:
    """The training data is read at least twice (fit, then scoring): refuse a single-use iterator."""
    if isinstance(loader, Iterator):  # a generator or an iterator: exhausted after one pass
        raise DataOrderError(
            f"{what} is a single-use iterator ({type(loader).__name__}): the training data is read once by fit "
            "and again by every score, so pass something that can be iterated again, e.g. a DataLoader or a list of batches."
        )


class eval_mode:
    """Run the model in eval mode (no dropout) and restore its training flag after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
