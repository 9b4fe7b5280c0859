"""What the engine asks of a model's use on a batch: the training loss, the measurement, padding and outputs.

A :class:`Task` separates what a user's setting decides from what the engine computes:

- ``loss``: one training loss per example ``[B]``; pass 1's curvature, the training gradients and
  self-influence use it.
- ``measurement``: what the validation and query side attributes, one value per example ``[B]``
  (by default the loss); e.g. the log-probability of one answer, or the margin of a classifier.
- ``padding_mask``: ``[B, T]``, 1 for a token and 0 for padding, or ``None``; padding positions
  contribute nothing to any gradient. By default a dict batch's 2-D ``attention_mask``; a
  :class:`~hyperinf.batches.ModulePadding` where layers run on different sequences (text and image patches).
- ``output_functions``: the loss split into the model's outputs ``[B, K]`` and the loss of them,
  which only the exact GGN needs (by default not given).

``InfluenceEngine(model, loss_fn)`` wraps a plain ``loss_fn(model, batch)`` in a :class:`LossTask`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hyperinf.batches import ModulePadding, padding_mask
from hyperinf.errors import ConfigurationError
from hyperinf.gradients import LossFn
from hyperinf.hessian import OutputFn, OutputFunctions, OutputLossFn, output_functions


class Task:
    """Subclass it and define :meth:`loss`; override the other methods where the defaults do not fit."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example training losses ``[B]``."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch) -> [B]")

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss: a task serves wherever a plain ``loss_fn(model, batch)`` does (e.g. to train)."""
        return self.loss(model, batch)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example values ``[B]`` attributed on validation and query batches (by default the loss)."""
        return self.loss(model, batch)

    def padding_mask(self, batch: Any) -> torch.Tensor | ModulePadding | None:
        """``[B, T]``, 1 for a token and 0 for padding: a dict batch's 2-D ``attention_mask`` by default."""
        return padding_mask(batch)

    def output_functions(self) -> OutputFunctions | None:
        """The loss split into the model's outputs and the loss of them (the exact GGN only); none by default."""
        return None


class LossTask(Task):
    """A task from a plain ``loss_fn(model, batch) -> [B]`` (and, for the exact GGN, ``output_fn`` / ``output_loss``)."""

    def __init__(
        self, loss_fn: LossFn, output_fn: OutputFn | None = None, output_loss: OutputLossFn | None = None
    ) -> None:
        self.loss_fn = loss_fn
        self.outputs = output_functions(output_fn, output_loss)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_fn(model, batch)

    def output_functions(self) -> OutputFunctions | None:
        return self.outputs


def as_task(task: Task | LossFn, output_fn: OutputFn | None, output_loss: OutputLossFn | None) -> Task:
    """``task`` itself, or a :class:`LossTask` around a plain loss function."""
    if not isinstance(task, Task):
        return LossTask(task, output_fn, output_loss)
    if output_fn is not None or output_loss is not None:
        raise ConfigurationError(
            "output_fn / output_loss were given with a Task: define Task.output_functions() instead."
        )
    return task
