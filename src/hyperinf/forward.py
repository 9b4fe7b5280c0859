"""Pass 2 without per-sample gradients: each example's score as the directional derivative of its loss.

With a preconditioned direction ``h`` known, ``<h, g_k>`` is the derivative of example k's loss
when the selected blocks' weights move along ``h``: one forward pass in forward-mode AD
(``torch.func.jvp``) gives it for every example of a batch, with no backward pass and no ``r x d``
gradient per example. One pass per direction. Attention runs on PyTorch's math SDPA kernel during
the pass: the fused CPU kernel has no forward-mode derivative. It runs only when asked for
(``pass2="jvp"``): it forms no per-example gradient (memory), but on the CPUs measured it costs
more time than the gradient path (benchmarks/bench_pass2.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from hyperinf.blocks import Block
from hyperinf.config import Pass2
from hyperinf.errors import ConfigurationError, EmptyDataError
from hyperinf.gradients import BatchGradients, LossFn, check_losses
from hyperinf.scoring import inner
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


def check_pass2(setting: Pass2, *, per_example: bool) -> None:
    """Refuse forward mode for a pass that needs each example's gradient (self-influence)."""
    if setting == "jvp" and per_example:
        raise ConfigurationError(
            "self-influence needs each example's gradient, which pass2='jvp' does not form: use pass2='gradients'."
        )


class TrainingScores:
    """Pass 2 over the training set: per batch, losses and scores ``-<h_j, g_k>`` ``[B, m]``, by either path.

    The gradient path replays or recomputes the per-sample gradients (:class:`TrainingGradients`)
    and also yields them (self-influence needs them); the forward-mode path yields ``None`` there.
    """

    def __init__(self, train: TrainingGradients, derivatives: DirectionalDerivatives, setting: Pass2) -> None:
        self.train, self.derivatives, self.setting = train, derivatives, setting
        self.path: str | None = None  # the path of the last pass

    def __call__(
        self, loader: Iterable[Any], h: Mapping[str, torch.Tensor], *, per_example: bool = False, skip: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, BatchGradients | None]]:
        """Batches after the first ``skip`` (those a resumed run already scored)."""
        check_pass2(self.setting, per_example=per_example)
        self.path = self.setting
        if self.path == "gradients":
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
