"""The exact Hessian of the training loss with respect to the selected blocks (small models only).

This is the textbook reference the Fisher-based approximations are judged against. Rows come
from double backward, one per parameter, in the coordinates of the blocks' ``r x d`` layouts
(block after block, each flattened row-major), so the Hessian lines up with the per-sample
gradients of :mod:`hyperinf.gradients`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hyperinf.blocks import Block, block_gradients_enabled
from hyperinf.gradients import LossFn


class HessianAccumulator:
    """Sums ``d^2 (sum_i loss_i) / d theta^2`` over batches; ``hessian()`` divides by ``n``."""

    def __init__(self, blocks: Sequence[Block], *, max_params: int, dtype: torch.dtype = torch.float32) -> None:
        self.blocks = list(blocks)
        self.num_params = sum(b.num_params for b in self.blocks)
        if self.num_params > max_params:
            raise ValueError(
                f"the exact Hessian of the selected blocks has {self.num_params} rows, above the limit "
                f"of {max_params}: select fewer blocks, or raise hessian_max_params if memory allows."
            )
        self.dtype = dtype
        self.total: torch.Tensor | None = None
        self.count = 0

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
        hessian = torch.stack(rows).to(self.dtype).detach()
        self.total = hessian if self.total is None else self.total + hessian
        self.count += losses.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """The running sum (for ``all_reduce`` across processes)."""
        if self.total is None:
            raise ValueError("no batch was added to the Hessian accumulator")
        return [self.total]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The running sum by name (none before the first batch), for checkpoints."""
        return {"total": self.total} if self.total is not None else {}

    def load(self, tensors: Mapping[str, torch.Tensor], count: int) -> None:
        """Replace the running sum by a checkpoint's (:meth:`named_tensors`) over ``count`` examples."""
        self.total = tensors["total"].to(self.dtype).clone() if "total" in tensors else None
        self.count = count

    def hessian(self) -> torch.Tensor:
        """The mean Hessian ``(1/n) sum_i d^2 loss_i / d theta^2``, symmetrised."""
        if self.total is None:
            raise ValueError("no batch was added to the Hessian accumulator")
        h = self.total / self.count
        return (h + h.T) / 2

    def _flatten(self, grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
        filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        pieces, position = [], 0
        for block in self.blocks:
            count = len(block.parameters())
            pieces.append(block.layout(*filled[position : position + count]).reshape(-1))
            position += count
        return torch.cat(pieces)
