"""Pass 2: one pass over the training set scoring every example against preconditioned directions ``h``.

Each batch gives its losses and scores ``-<h_j, g_k>`` ``[B, m]`` by one of two paths:

- ``"gradients"``: the per-sample training gradients, replayed from pass 1's cache or recomputed
  (:class:`hyperinf.sources.TrainingGradients`); the only path that also gives each example's
  gradient, which self-influence needs.
- ``"jvp"``: ``<h, g_k>`` is the derivative of example k's loss when the selected blocks' weights
  move along ``h``: one forward pass in forward-mode AD (``torch.func.jvp``) per direction gives it
  for every example of a batch, with no backward pass and no ``r x d`` gradient per example.
  Attention runs on PyTorch's math SDPA kernel during the pass (the fused CPU kernel has no
  forward-mode derivative). It forms no per-example gradient (memory), but on the CPUs measured it
  costs more time than the gradient path (benchmarks/bench_pass2.py).

:class:`TrainingPasses` gathers a pass batch by batch, resumable from a checkpoint
(:mod:`hyperinf.checkpoints`); the arithmetic is in :mod:`hyperinf.scoring`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from hyperinf.blocks import Block
from hyperinf.checkpoints import PassCheckpoint
from hyperinf.config import Pass2
from hyperinf.errors import ConfigurationError, EmptyDataError
from hyperinf.gradients import BatchGradients, LossFn, check_losses
from hyperinf.preconditioners import Preconditioner
from hyperinf.scoring import inner, self_influence
from hyperinf.sources import TrainingGradients, check_order


class _BatchLoss(nn.Module):
    """``loss_fn(model, batch)`` as a module without inputs, so ``functional_call`` can swap the block weights."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.model, self.loss_fn, self.batch = model, loss_fn, batch

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.model, self.batch)


class DirectionalDerivatives:
    """``(losses [B], <h_j, g_k> [B, m])`` for a batch and directions ``{block: [m, r, d]}`` by forward-mode AD."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, blocks: Sequence[Block]) -> None:
        self.model, self.loss_fn, self.blocks = model, loss_fn, list(blocks)
        self.names = [
            f"model.{b.name}.{kind}" for b in self.blocks for kind in ("weight", "bias")[: len(b.parameters())]
        ]

    def __call__(self, batch: Any, directions: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        wrapped = _BatchLoss(self.model, self.loss_fn, batch)
        primals = tuple(p.detach() for b in self.blocks for p in b.parameters())

        def losses(*weights: torch.Tensor) -> torch.Tensor:
            return functional_call(wrapped, dict(zip(self.names, weights)), ())

        m = next(iter(directions.values())).shape[0]
        columns: list[torch.Tensor] = []
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
            # torch.func's first jvp scripts a helper and warns that torch.jit.script is deprecated: not ours to act on.
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
            )
            for j in range(m):
                tangents = tuple(
                    t.to(p) for b in self.blocks for t, p in zip(b.unlayout(directions[b.name][j]), b.parameters())
                )
                value, derivative = jvp(losses, primals, tangents)[:2]
                check_losses(value, need_graph=False)
                columns.append(derivative)
        return value, torch.stack(columns, dim=1)


@dataclass
class TrainingPass(Mapping[str, torch.Tensor]):
    """What one pass over the training set gives: scores per method (the mapping), losses, self-influence,
    and each method's preconditioned validation gradient ``h`` (per block, ``[1, r, d]``) that it scored with."""

    scores: dict[str, torch.Tensor]
    train_loss: torch.Tensor
    self_influence: torch.Tensor | None = None
    directions: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __getitem__(self, method: str) -> torch.Tensor:
        return self.scores[method]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)


ScoredBatch = tuple[torch.Tensor, torch.Tensor, BatchGradients | None]  # losses [B], scores [B, m], gradients


class TrainingPasses:
    """Passes over the training set by the configured path: scored batches, whole scoring passes, self-influence."""

    def __init__(self, train: TrainingGradients, derivatives: DirectionalDerivatives, setting: Pass2) -> None:
        self.train, self.derivatives, self.setting = train, derivatives, setting
        self.path: str | None = None  # the path of the last pass

    def batches(self, loader: Iterable[Any], h: Mapping[str, torch.Tensor], *, skip: int = 0) -> Iterator[ScoredBatch]:
        """Per batch after the first ``skip`` (those a resumed run already scored): losses, scores ``-<h_j, g_k>``
        and, on the gradient path, the batch's per-sample gradients (``None`` in forward mode)."""
        self.path = self.setting
        if self.setting == "gradients":
            for batch in self.train(loader, skip=skip):
                yield batch.losses, -inner(batch.grads, h), batch
            return
        check_order(loader, "train_loader")
        seen = 0
        for _, batch in self.train.stream.batches(loader, "forward-mode: train_loader", skip=skip):
            value, derivative = self.derivatives(batch, h)
            seen += value.shape[0]
            yield value, -derivative, None
        if seen == 0 and not skip:
            raise EmptyDataError("train_loader yielded no examples: pass a loader over at least one example.")

    def scores(
        self,
        loader: Iterable[Any],
        h: Mapping[str, torch.Tensor],
        columns: Sequence[str],
        *,
        own: Preconditioner | None = None,
        saver: PassCheckpoint | None = None,
        what: str = "score",
        keep: bool = False,
    ) -> TrainingPass:
        """One column of scores per direction of ``h`` (named ``columns``), the losses and, with ``own``, the
        self-influence under that preconditioner. ``saver`` makes the pass resumable (``keep``: one pass of several,
        whose checkpoint is kept whole for a rerun to read back)."""
        if own is not None and self.setting == "jvp":
            raise ConfigurationError(
                "self-influence needs each example's gradient, which pass2='jvp' does not form: use pass2='gradients'."
            )
        done, state = saver.resume(what) if saver is not None else (0, {})

        def rows() -> Iterator[dict[str, torch.Tensor]]:
            for losses, scores, batch in self.batches(loader, h, skip=done):
                row = {"losses": losses.detach(), "scores": scores}
                if own is not None and batch is not None:
                    row["self_influence"] = self_influence(own, batch.grads)
                yield row

        result = _gather(rows(), saver, done, state, keep)
        return TrainingPass(
            dict(zip(columns, result["scores"].unbind(1))), result["losses"], result.get("self_influence")
        )

    def self_influence(
        self, loader: Iterable[Any], own: Preconditioner, saver: PassCheckpoint | None = None
    ) -> torch.Tensor:
        """``- sum_l <A_l^{-1} g_k, g_k>`` per training example, from the per-sample gradients."""
        done, state = saver.resume("self_influence") if saver is not None else (0, {})
        rows = ({"self_influence": self_influence(own, batch.grads)} for batch in self.train(loader, skip=done))
        self.path = "gradients"
        return _gather(rows, saver, done, state, keep=False)["self_influence"]


def _gather(
    rows: Iterable[Mapping[str, torch.Tensor]],
    saver: PassCheckpoint | None,
    done: int,
    state: Mapping[str, torch.Tensor],
    keep: bool,
) -> dict[str, torch.Tensor]:
    """Concatenate each named per-batch tensor over a pass that already gathered ``state`` over its first ``done``
    batches; ``saver`` writes the gathering so far every few batches, and at the end deletes it (or, with ``keep``,
    writes the whole pass there)."""
    parts: dict[str, list[torch.Tensor]] = {name: [t] for name, t in state.items()}

    def gathered() -> dict[str, torch.Tensor]:
        return {name: torch.cat(pieces) for name, pieces in parts.items()}

    for done, row in enumerate(rows, start=done + 1):
        for name, t in row.items():
            parts.setdefault(name, []).append(t)
        if saver is not None:
            saver.save(done, gathered)
    result = gathered()
    if saver is not None and keep:
        saver.save(done, lambda: result, force=True)
    elif saver is not None:
        saver.finish()
    return result
