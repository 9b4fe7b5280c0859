"""Exact second-order curvature of the training loss in the selected blocks (small models only).

- :class:`HessianAccumulator`: the Hessian ``d^2 loss / d theta^2``, the textbook reference the
  Fisher-based approximations are judged against. Rows come from double backward, one per parameter.
- :class:`GGNAccumulator`: the generalized Gauss-Newton matrix ``(1/n) sum_i J_i^T H_i J_i``,
  ``J_i`` the Jacobian of example ``i``'s model outputs and ``H_i`` the Hessian of the loss in
  those outputs: positive semi-definite where a non-convex network's Hessian is not, and the
  matrix K-FAC / EK-FAC approximate. Rows of ``J_i`` are per-example gradients of one output
  coordinate each (:class:`~hyperinf.gradients.PerSampleGradients`, one backward per output).

Both are in the coordinates of the blocks' ``r x d`` layouts (block after block, each flattened
row-major), so they line up with the per-sample gradients of :mod:`hyperinf.gradients`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hyperinf.batches import padding_mask
from hyperinf.blocks import Block, block_gradients_enabled
from hyperinf.errors import ConfigurationError, LossShapeError
from hyperinf.gradients import LossFn, PaddingFn, PerSampleGradients

OutputFn = Callable[[nn.Module, Any], torch.Tensor]
OutputLossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class OutputFunctions:
    """``loss_fn`` split in two for the GGN: ``output_fn(model, batch) -> [B, K]``, ``output_loss(outputs, batch) -> [B]``.

    ``output_loss(output_fn(model, batch), batch)`` should equal ``loss_fn(model, batch)``, and
    example ``i``'s loss should depend on its own outputs only (e.g. logits and ``F.cross_entropy``).
    """

    output_fn: OutputFn
    output_loss: OutputLossFn


def output_functions(output_fn: OutputFn | None, output_loss: OutputLossFn | None) -> OutputFunctions | None:
    """Both functions, or neither (only the exact GGN needs them); one without the other is an error."""
    if (output_fn is None) != (output_loss is None):
        given, missing = ("output_fn", "output_loss") if output_loss is None else ("output_loss", "output_fn")
        raise ConfigurationError(
            f"{given} was given without {missing}: the exact GGN needs both (or neither for other methods)."
        )
    return OutputFunctions(output_fn, output_loss) if output_fn is not None and output_loss is not None else None


def check_exact_size(blocks: Sequence[Block], max_params: int, what: str = "exact curvature") -> int:
    """The selected blocks' parameter count ``P``; a clear error when a ``P x P`` matrix would pass ``max_params`` rows."""
    num_params = sum(b.num_params for b in blocks)
    if num_params > max_params:
        raise ConfigurationError(
            f"the {what} of the selected blocks has {num_params} rows, above the limit "
            f"of {max_params}: select fewer blocks, or raise hessian_max_params if memory allows."
        )
    return num_params


def require_outputs(outputs: OutputFunctions | None) -> OutputFunctions:
    """The model's outputs and the loss of them, which the exact GGN needs; a clear error when they were not given."""
    if outputs is None:
        raise ConfigurationError(
            "method 'exact-ggn' needs the model's outputs and the loss of them separately: pass "
            "InfluenceEngine(model, loss_fn, output_fn=..., output_loss=...), with output_fn(model, batch) -> [B, K] "
            "and output_loss(outputs, batch) -> [B] such that output_loss(output_fn(model, batch), batch) is "
            "loss_fn(model, batch); e.g. output_fn=lambda model, batch: model(batch[0]) (the logits) and "
            "output_loss=lambda logits, batch: F.cross_entropy(logits, batch[1], reduction='none')."
        )
    return outputs


class _ExactAccumulator:
    """A running sum of ``P x P`` matrices over the selected blocks' ``P`` parameters, ``P`` capped by ``max_params``."""

    what = "exact curvature"

    def __init__(self, blocks: Sequence[Block], *, max_params: int, dtype: torch.dtype = torch.float32) -> None:
        self.blocks = list(blocks)
        self.num_params = check_exact_size(self.blocks, max_params, self.what)
        self.dtype = dtype
        self.total: torch.Tensor | None = None
        self.count = 0

    def _add(self, matrix: torch.Tensor, count: int) -> None:
        matrix = matrix.to(self.dtype).detach()
        self.total = matrix if self.total is None else self.total + matrix
        self.count += count

    def tensors(self) -> list[torch.Tensor]:
        """The running sum (for ``all_reduce`` across processes)."""
        if self.total is None:
            raise ValueError(f"no batch was added to the {self.what} accumulator")
        return [self.total]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The running sum by name (none before the first batch), for checkpoints."""
        return {"total": self.total} if self.total is not None else {}

    def load(self, tensors: Mapping[str, torch.Tensor], count: int) -> None:
        """Replace the running sum by a checkpoint's (:meth:`named_tensors`) over ``count`` examples."""
        self.total = tensors["total"].to(self.dtype).clone() if "total" in tensors else None
        self.count = count

    def matrix(self) -> torch.Tensor:
        """The mean over the ``n`` examples, symmetrised."""
        if self.total is None:
            raise ValueError(f"no batch was added to the {self.what} accumulator")
        mean = self.total / self.count
        return (mean + mean.T) / 2


class HessianAccumulator(_ExactAccumulator):
    """Sums ``d^2 (sum_i loss_i) / d theta^2`` over batches; ``matrix()`` divides by ``n``."""

    what = "exact Hessian"

    def update(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        """Add the Hessian of the summed loss of one batch."""
        params = [p for b in self.blocks for p in b.parameters()]
        with block_gradients_enabled(self.blocks):
            losses = loss_fn(model, batch)
            grads = torch.autograd.grad(losses.sum(), params, create_graph=True, allow_unused=True)
            flat = self._flatten(grads, params)
            rows = []
            for i in range(flat.numel()):
                if not flat[i].requires_grad:
                    rows.append(torch.zeros_like(flat))
                    continue
                second = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
                rows.append(self._flatten(second, params))
        self._add(torch.stack(rows), losses.shape[0])

    def _flatten(self, grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
        filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        pieces, position = [], 0
        for block in self.blocks:
            count = len(block.parameters())
            pieces.append(block.layout(*filled[position : position + count]).reshape(-1))
            position += count
        return torch.cat(pieces)


class GGNAccumulator(_ExactAccumulator):
    """Sums ``sum_i J_i^T H_i J_i`` over batches; ``matrix()`` divides by ``n``. ``outputs``: the model's outputs
    and the loss of them (:func:`require_outputs`)."""

    what = "exact GGN"

    def __init__(
        self,
        blocks: Sequence[Block],
        outputs: OutputFunctions,
        *,
        max_params: int,
        dtype: torch.dtype = torch.float32,
        padding: PaddingFn = padding_mask,
    ) -> None:
        super().__init__(blocks, max_params=max_params, dtype=dtype)
        self.outputs, self.padding = outputs, padding

    def update(self, model: nn.Module, batch: Any) -> None:
        """Add ``J_i^T H_i J_i`` of every example of one batch (``K`` backward passes for ``J``, ``K`` for ``H``)."""
        outputs = self.outputs
        with torch.no_grad():
            f = outputs.output_fn(model, batch)
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise LossShapeError(f"output_fn must return the model's outputs as a [B, K] tensor, got {_shape_of(f)}.")
        jacobian = torch.stack(
            [self._output_gradients(model, outputs.output_fn, k, batch) for k in range(f.shape[1])], dim=1
        )
        hessian = self._output_hessian(outputs.output_loss, f.detach(), batch).to(jacobian)
        self._add(torch.einsum("bkp,bkq->pq", jacobian, hessian @ jacobian), f.shape[0])

    def _output_gradients(self, model: nn.Module, output_fn: OutputFn, k: int, batch: Any) -> torch.Tensor:
        """``d f_ik / d theta`` of every example ``i``, flattened in layout order: ``[B, P]``."""
        output = PerSampleGradients(
            model, lambda m, b: output_fn(m, b)[:, k], self.blocks, dtype=self.dtype, padding=self.padding
        )
        grads = output(batch).grads
        return torch.cat([grads[b.name].flatten(1) for b in self.blocks], dim=1)

    @staticmethod
    def _output_hessian(output_loss: OutputLossFn, f: torch.Tensor, batch: Any) -> torch.Tensor:
        """``H_i = d^2 loss_i / d f_i^2`` of every example: ``[B, K, K]`` (example ``i``'s loss depends on ``f_i`` only)."""
        f = f.requires_grad_()
        with torch.enable_grad():
            losses = output_loss(f, batch)
            if not isinstance(losses, torch.Tensor) or losses.shape != f.shape[:1]:
                raise LossShapeError(
                    f"output_loss must return one loss per example, shape [{f.shape[0]}], got {_shape_of(losses)}: "
                    "use reduction='none' (e.g. F.cross_entropy(outputs, labels, reduction='none'))."
                )
            (first,) = torch.autograd.grad(losses.sum(), f, create_graph=True)
            rows = []
            for k in range(f.shape[1]):
                second = None  # stays None where the loss is linear in f
                if first.requires_grad:
                    (second,) = torch.autograd.grad(first[:, k].sum(), f, retain_graph=True, allow_unused=True)
                rows.append(torch.zeros_like(f) if second is None else second)
        return torch.stack(rows, dim=1).detach()


def _shape_of(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
