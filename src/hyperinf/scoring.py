"""Pass 2's arithmetic: scores ``-<h, g_k>``, self-influence, query chunks and streamed top-k (the passes: :mod:`hyperinf.pass2`).

Everything here works on per-block tensors ``{name: [m, r, d]}`` and never holds more than one
batch of training gradients next to one chunk of preconditioned queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from hyperinf.gradients import BatchGradients
from hyperinf.preconditioners import Preconditioner


def inner(grads: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum_l <g_{k,l}, h_{j,l}>`` for every training row k and preconditioned column j: ``[B, m]``."""
    terms = [torch.einsum("brd,mrd->bm", g, h[name].to(device=g.device, dtype=g.dtype)) for name, g in grads.items()]
    return _sum_on_first_device(terms)


def self_influence(pre: Preconditioner, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``- sum_l <A_l^{-1} g_k, g_k>`` for each example of a batch."""
    h = pre.apply(grads)
    return -_sum_on_first_device([(g * h[name].to(g)).flatten(1).sum(1) for name, g in grads.items()])


def _sum_on_first_device(terms: list[torch.Tensor]) -> torch.Tensor:
    """Sum per-block terms that may live on different devices (a model split with ``device_map``)."""
    return sum(t.to(terms[0].device) for t in terms[1:]) + terms[0]


def query_chunks(batches: Iterable[BatchGradients], size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Regroup the rows of ``batches`` into chunks of exactly ``size`` rows (the last may be smaller)."""
    if size < 1:
        raise ValueError(f"query_chunk must be >= 1, got {size}")
    pending: list[dict[str, torch.Tensor]] = []
    rows = 0
    for batch in batches:
        grads, start = batch.grads, 0
        while start < batch.batch_size:
            take = min(size - rows, batch.batch_size - start)
            pending.append({name: g[start : start + take] for name, g in grads.items()})
            rows, start = rows + take, start + take
            if rows == size:
                yield _stack(pending)
                pending, rows = [], 0
    if pending:
        yield _stack(pending)


def _stack(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}


@dataclass
class TopK:
    """For each query, the ``k`` most helpful (most negative score) and most harmful training examples.

    Indices are positions in the training loader's order (with ``distributed=True``: in the
    process's own shard); each row is sorted from the strongest to the weakest.
    """

    helpful: torch.Tensor  # [m, k] training indices
    helpful_scores: torch.Tensor  # [m, k]
    harmful: torch.Tensor
    harmful_scores: torch.Tensor

    @classmethod
    def cat(cls, parts: Sequence[TopK]) -> TopK:
        """The queries of ``parts`` (chunks of queries, in order) in one result."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


class RunningTopK:
    """Keeps the ``k`` smallest and largest scores per query column while training batches stream past."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.offset = 0
        self._low: tuple[torch.Tensor, torch.Tensor] | None = None
        self._high: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, scores: torch.Tensor) -> None:
        """Add one batch of scores ``[B, m]`` for training rows ``offset .. offset + B - 1``."""
        index = torch.arange(self.offset, self.offset + scores.shape[0], device=scores.device)
        index = index.unsqueeze(1).expand_as(scores)
        self.offset += scores.shape[0]
        self._low = self._merge(self._low, scores, index, largest=False)
        self._high = self._merge(self._high, scores, index, largest=True)

    def _merge(
        self, best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, index: torch.Tensor, largest: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if best is not None:
            scores, index = torch.cat([best[0], scores]), torch.cat([best[1], index])
        values, rows = torch.topk(scores, min(self.k, scores.shape[0]), dim=0, largest=largest, sorted=True)
        return values, index.gather(0, rows)

    def result(self) -> TopK:
        """Per query ``[m, k]`` (``k`` capped at the number of training examples seen)."""
        if self._low is None or self._high is None:
            raise ValueError("no training scores were added")
        return TopK(self._low[1].T, self._low[0].T, self._high[1].T, self._high[0].T)
