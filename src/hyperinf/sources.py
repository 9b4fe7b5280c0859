"""The training-gradient source: per-sample gradients over a loader, kept from pass 1 for pass 2.

:class:`GradientStream` turns a loader into :class:`~hyperinf.gradients.BatchGradients` (model in
eval mode, batches moved to the model's device, a progress bar, a clear error for empty data).
:class:`TrainingGradients` records pass 1's gradients in memory while their size stays within a
budget and replays them in pass 2; past the budget they go to disk when a spill directory is set
(:mod:`hyperinf.spill`), else pass 2 recomputes them, as it does for another loader.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from hyperinf.batches import to_device
from hyperinf.errors import DataOrderError, EmptyDataError, SpillWarning
from hyperinf.gradients import BatchGradients, PerSampleGradients
from hyperinf.preconditioners import Reduce
from hyperinf.spill import GradientSpill, SpillDtype, remove_orphans, room_for


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


@dataclass(frozen=True)
class GradientPlan:
    """What pass 1 will keep for ``examples`` training examples: the blocks' gradient shapes, the bytes of
    every per-example gradient, and where they go (``store``, for people: kept in memory, written to the
    spill folder past the budget, or recomputed in pass 2 when nothing may be spilled)."""

    examples: int
    shapes: dict[tuple[int, int], int]  # (r, d) -> number of blocks of that layout
    bytes: int
    store: str

    @property
    def parameters(self) -> int:
        """Attributed parameters per example (the size of one example's gradient)."""
        return sum(r * d * n for (r, d), n in self.shapes.items())

    def describe(self) -> list[str]:
        """Two lines for people: the blocks, and the per-example gradients' size and place."""
        listed = ", ".join(f"{n} x [{r} x {d}]" for (r, d), n in sorted(self.shapes.items()))
        return [
            f"blocks: {sum(self.shapes.values())} ({listed}), {self.parameters:,} parameters per example",
            f"per-example gradients of {self.examples} examples: {_size(self.bytes)}, {self.store}",
        ]


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


class TrainingGradients:
    """Pass 1 records the training gradients (in memory up to ``budget_bytes``, then on disk under
    ``spill_dir`` if one is given); pass 2 replays them, or recomputes them when neither held them."""

    def __init__(
        self,
        stream: GradientStream,
        budget_bytes: int,
        spill_dir: str | Path | None = None,
        spill_dtype: SpillDtype = "full",
    ) -> None:
        self.stream = stream
        self.budget_bytes = budget_bytes
        self.spill_dir, self.spill_dtype = spill_dir, spill_dtype
        self.fit_loader: Iterable[Any] | None = None
        self.gradient_bytes = 0  # size of all per-sample training gradients of the fit
        self._cache: list[BatchGradients] | GradientSpill | None = None

    @property
    def cached(self) -> bool:
        """Whether the fit's gradients were kept (in memory or spilled to disk)."""
        return self._cache is not None

    @property
    def store(self) -> str | None:
        """Where the fit's gradients are kept: ``"memory"``, ``"disk"`` or ``None`` (recomputed)."""
        return None if self._cache is None else "disk" if isinstance(self._cache, GradientSpill) else "memory"

    def record(
        self, loader: Iterable[Any], *, allow_empty: bool = False, skip: int = 0
    ) -> Iterator[tuple[Any, BatchGradients]]:
        """Pass 1 over ``loader`` (after ``skip`` batches): yield every batch with its gradients and keep them
        (not on a resumed pass, whose first batches are not in memory)."""
        check_order(loader, "train_loader")
        check_reiterable(loader, "train_loader")
        self.forget()
        if self.spill_dir is not None:
            remove_orphans(self.spill_dir)
        cache: list[BatchGradients] | GradientSpill | None = [] if not skip else None
        total = 0
        for batch, grads in self.stream(loader, "train_loader", allow_empty=allow_empty, skip=skip):
            total += sum(g.numel() * g.element_size() for g in grads.grads.values())
            kept = BatchGradients(grads.losses, grads.grads)  # not pass 1's token factors
            if isinstance(cache, list) and total > self.budget_bytes:
                cache = self._spill([*cache, kept], loader, total)
            else:
                cache = _keep(cache, kept)
            yield batch, grads
        if isinstance(cache, GradientSpill):
            cache.finish()
        self.fit_loader, self.gradient_bytes, self._cache = loader, total, cache

    def _spill(self, kept: list[BatchGradients], loader: Iterable[Any], total: int) -> GradientSpill | None:
        """Move the batches so far (``total`` bytes) to a new spill file, or ``None`` (recompute) without a
        spill directory or the disk room the whole pass will take (estimated from these batches)."""
        if self.spill_dir is None:
            return None
        expected = total / len(kept) * len(loader) if isinstance(loader, Sized) else total
        element = next(iter(kept[0].grads.values())).element_size()
        if not room_for(self.spill_dir, int(expected * (2 / element if self.spill_dtype == "bfloat16" else 1))):
            return None
        spill = GradientSpill(self.spill_dir, self.spill_dtype)
        for batch in kept:
            if _keep(spill, batch) is None:
                return None
        return spill

    def plan(self, examples: int, shapes: dict[tuple[int, int], int], itemsize: int) -> GradientPlan:
        """Where :meth:`record` will keep the gradients of ``examples`` examples of these block shapes."""
        total = examples * itemsize * sum(r * d * n for (r, d), n in shapes.items())
        if total <= self.budget_bytes:
            store = "kept in memory"
        elif self.spill_dir is not None:
            store = f"past the memory budget: written to {self.spill_dir} (if the disk has room)"
        else:
            store = "past the memory budget: recomputed in pass 2"
        return GradientPlan(examples, shapes, total, store)

    def forget(self, loader: Iterable[Any] | None = None) -> None:
        """Drop the kept gradients (a spill file is deleted); ``loader`` (if given) is the training data of a fit loaded from disk."""
        if isinstance(self._cache, GradientSpill):
            self._cache.close()
        self.fit_loader, self.gradient_bytes, self._cache = loader, 0, None

    def holds(self, loader: Iterable[Any]) -> bool:
        """Whether the kept gradients are ``loader``'s (it is the fit's loader, and they were kept)."""
        return self._cache is not None and loader is self.fit_loader

    def __call__(self, loader: Iterable[Any], *, skip: int = 0) -> Iterator[BatchGradients]:
        """The per-sample gradients of ``loader`` after ``skip`` batches: kept ones when they are this loader's, else recomputed."""
        cache = self._cache if self.holds(loader) else None
        if cache is not None:
            yield from cache.read(skip) if isinstance(cache, GradientSpill) else cache[skip:]
            return
        check_order(loader, "train_loader")
        for _, grads in self.stream(loader, "train_loader", skip=skip):
            yield grads


def _keep(
    cache: list[BatchGradients] | GradientSpill | None, batch: BatchGradients
) -> list[BatchGradients] | GradientSpill | None:
    """Add ``batch`` to the cache; a spill that fails to write (a full disk) is deleted and becomes ``None``."""
    if isinstance(cache, list):
        cache.append(batch)
    elif isinstance(cache, GradientSpill):
        try:
            cache.append(batch)
        except OSError as error:
            cache.close()
            warnings.warn(
                f"spilling the training gradients to {cache.folder} failed ({error}): pass 2 recomputes them instead.",
                SpillWarning,
                stacklevel=3,
            )
            return None
    return cache


def mean_gradient(
    stream: GradientStream,
    loader: Iterable[Any],
    what: str,
    *,
    dtype: torch.dtype,
    reduce: Reduce,
    allow_empty: bool = False,
) -> dict[str, torch.Tensor]:
    """The mean per-block gradient ``v_l`` over a loader; ``reduce`` sums over processes (distributed runs)."""
    blocks = stream.gradients.blocks
    total = {b.name: torch.zeros(b.shape, dtype=dtype, device=b.device) for b in blocks}
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
