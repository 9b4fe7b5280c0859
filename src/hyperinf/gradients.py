"""Per-sample gradients of the selected blocks from one forward and one backward pass per batch.

A forward hook on each block keeps the layer input ``a`` and output ``y``; ``torch.autograd.grad``
of the summed per-example loss with respect to the outputs gives ``delta = dL/dy``; the block's
layer kind (:mod:`hyperinf.layers`) views both per position (tokens, or a convolution's output
pixels with their input patches), and the per-example weight gradient is ``sum_p delta_p a_p^T``
(one einsum per block, on the device of that block's weight, so a model split over devices works). Parameter
``.grad`` fields are never touched, and only the part of the graph between the loss and the
hooked outputs is differentiated. This works where ``torch.func.vmap`` fails on
Hugging Face models (attention-mask code calls ``.all()``).

With ``kronecker=True`` (K-FAC / EK-FAC) each batch also carries, per block, the sums over its
non-padding tokens of ``a a^T`` (``a`` with a 1 appended when the block includes its bias) and
``delta delta^T``, and the token count: the Kronecker factors, at ``O(d_in^2 + d_out^2)`` per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from hyperinf.batches import ModulePadding, padding_mask
from hyperinf.blocks import Block, block_gradients_enabled
from hyperinf.errors import BlockSelectionError, LossShapeError, NonFiniteGradientError

LossFn = Callable[[nn.Module, Any], torch.Tensor]
PaddingFn = Callable[[Any], torch.Tensor | ModulePadding | None]
Factors = tuple[torch.Tensor | None, torch.Tensor | None]  # (R, D) of a projection X -> R X D^T; None: kept whole


@dataclass
class TokenFactors:
    """One block's sums over a batch's non-padding tokens: ``a a^T`` (``[d_in(+1), d_in(+1)]``), ``delta delta^T``, count."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    tokens: int

    def __add__(self, other: TokenFactors) -> TokenFactors:
        return TokenFactors(self.inputs + other.inputs, self.outputs + other.outputs, self.tokens + other.tokens)


@dataclass
class BatchGradients:
    """Per-example losses ``[B]``, per-block gradients ``{name: [B, r, d]}`` and, when asked, token factors."""

    losses: torch.Tensor
    grads: dict[str, torch.Tensor]
    factors: dict[str, TokenFactors] | None = None

    @property
    def batch_size(self) -> int:
        return self.losses.shape[0]


class PerSampleGradients:
    """Computes :class:`BatchGradients` for batches of ``model`` under ``loss_fn``.

    ``loss_fn(model, batch)`` must return one loss per example (shape ``[B]``). Padding positions
    named by ``padding(batch)`` (``[B, T]``, by default a dict batch's 2-D ``attention_mask``; a
    :class:`~hyperinf.batches.ModulePadding` where layers run on different sequences) are zeroed, so they
    contribute nothing even if the model leaks gradient into them (see :func:`_token_mask` for which layer
    inputs it applies to).
    ``kronecker`` adds each block's :class:`TokenFactors` (see :meth:`capturing_factors`). ``project`` maps a block
    to ``(R, D)`` (``k_r x r``, ``k_d x d``, ``None`` for a side kept whole): the block's gradient is then
    ``R g D^T`` ``[B, k_r, k_d]``, formed from the projected output gradients and inputs without ``g`` itself.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        blocks: Sequence[Block],
        *,
        dtype: torch.dtype = torch.float32,
        kronecker: bool = False,
        padding: PaddingFn = padding_mask,
        project: Mapping[str, Factors] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.blocks = list(blocks)
        self.dtype = dtype
        self.padding = padding
        self.kronecker = kronecker
        self.project = project

    @contextmanager
    def capturing_factors(self, on: bool = True) -> Iterator[None]:
        """Within the block, batches carry their :class:`TokenFactors` when ``on`` (pass 1 of K-FAC / EK-FAC only)."""
        saved, self.kronecker = self.kronecker, on
        try:
            yield
        finally:
            self.kronecker = saved

    def __call__(self, batch: Any, *, batch_index: int = 0) -> BatchGradients:
        with self._capture() as records:
            losses = self.loss_fn(self.model, batch)
            check_losses(losses)
            outputs = [y for block in self.blocks for _, y in records[block.name]]
            deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else ()
        losses = losses.detach()
        padding = self.padding(batch)
        grads: dict[str, torch.Tensor] = {}
        factors: dict[str, TokenFactors] | None = {} if self.kronecker else None
        position = 0
        for block in self.blocks:
            calls = records[block.name]
            if not calls:
                raise BlockSelectionError(
                    f"block {block.name!r} was not called in the forward pass of batch {batch_index}: "
                    "check that loss_fn runs the model and that the adapter is active and not merged."
                )
            g, block_factors = None, None
            mask = padding.for_block(block.name) if isinstance(padding, ModulePadding) else padding
            for (a, _), delta in zip(calls, deltas[position : position + len(calls)]):
                term, term_factors = self._block_gradient(block, a, delta, mask, losses.shape[0], batch_index)
                g = term if g is None else g + term
                if term_factors is not None:
                    block_factors = term_factors if block_factors is None else block_factors + term_factors
            position += len(calls)
            if factors is not None and block_factors is not None:
                factors[block.name] = block_factors
            assert g is not None  # every block was called at least once (checked above)
            if not torch.isfinite(g).all():
                raise NonFiniteGradientError(
                    f"NaN/Inf in the per-sample gradients of block {block.name!r} in batch {batch_index}: "
                    "check the inputs and the loss of that batch (e.g. log of 0, a diverged model)."
                )
            grads[block.name] = g
        return BatchGradients(losses, grads, factors)

    def _block_gradient(
        self,
        block: Block,
        a: torch.Tensor,
        delta: torch.Tensor | None,
        mask: torch.Tensor | None,
        batch_size: int,
        batch_index: int,
    ) -> tuple[torch.Tensor, TokenFactors | None]:
        """The block's per-example gradient ``[B, r, d]`` from one call, and its token factors when asked."""
        if a.shape[0] != batch_size:
            raise LossShapeError(
                f"block {block.name!r} saw an input with leading dimension {a.shape[0]} in batch "
                f"{batch_index}, but loss_fn returned {batch_size} losses: per-sample gradients need "
                "the batch dimension first in every selected layer's input."
            )
        device, kind = block.device, block.kind
        positions = _token_mask(block, a.shape, mask, batch_index) if kind.masks_tokens else None
        a = kind.inputs(block.module, a.to(device=device, dtype=self.dtype))
        if delta is None:  # the output did not reach the loss
            delta = a.new_zeros(*a.shape[:-1], kind.matrix_shape(block.module)[0])
        else:
            delta = kind.output_grads(block.module, delta.to(device=device, dtype=self.dtype))
        if positions is not None:
            delta = delta * positions.to(device=device, dtype=self.dtype).unsqueeze(-1)
        if self.project is not None:
            return self._projected_gradient(block, a, delta, positions)
        weight_grad = torch.einsum("bto,bti->boi", delta, a)
        bias_grad = delta.sum(dim=1) if block.has_bias else None
        gradient = block.layout_matrix(weight_grad, bias_grad)
        return gradient, (self._token_factors(block, a, delta, positions) if self.kronecker else None)

    def _projected_gradient(
        self, block: Block, a: torch.Tensor, delta: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, TokenFactors | None]:
        """``R g D^T`` ``[B, k_r, k_d]`` as ``sum_t (R x_t)(D y_t)^T`` over the layout's row and column factors per
        token (``delta`` and ``a``, a 1 appended to ``a`` for the bias): no ``[B, r, d]`` gradient is formed. With
        ``kronecker``, also the token factors of the projected block, a ``k_d -> k_r`` layer: sums of ``(D y_t)(D
        y_t)^T`` as its inputs' and of ``(R x_t)(R x_t)^T`` as its output gradients' (the K-FAC factors of the
        projected model; which side is normalised per token or per example does not change their product)."""
        assert self.project is not None
        if block.has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        if positions is not None:  # delta is masked already; masking a too keeps padding out of its token sums
            a = a * positions.to(a).unsqueeze(-1)
        rows, columns = block.kronecker_order(a, delta)
        left, right = self.project[block.name]
        if left is not None:
            rows = rows @ left.to(rows).T
        if right is not None:
            columns = columns @ right.to(columns).T
        gradient = torch.einsum("btr,btd->brd", rows, columns)
        if not self.kronecker:
            return gradient, None
        tokens = a.shape[0] * a.shape[1] if positions is None else int(positions.sum())
        rows, columns = rows.reshape(-1, rows.shape[-1]), columns.reshape(-1, columns.shape[-1])
        return gradient, TokenFactors(columns.T @ columns, rows.T @ rows, tokens)

    @staticmethod
    def _token_factors(
        block: Block, a: torch.Tensor, delta: torch.Tensor, positions: torch.Tensor | None
    ) -> TokenFactors:
        """Sums over the non-padding tokens of ``a a^T`` (bias: a 1 appended) and ``delta delta^T`` (delta is masked already)."""
        a = a.reshape(-1, a.shape[-1])
        if block.has_bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        keep = positions.reshape(-1).to(a) if positions is not None else None
        tokens = a.shape[0] if keep is None else int(keep.sum())
        masked = a if keep is None else a * keep.unsqueeze(1)
        delta = delta.reshape(-1, delta.shape[-1])
        return TokenFactors(masked.T @ a, delta.T @ delta, tokens)

    @contextmanager
    def _capture(self) -> Iterator[dict[str, list[tuple[torch.Tensor, GradientEdge]]]]:
        records: dict[str, list[tuple[torch.Tensor, GradientEdge]]] = {b.name: [] for b in self.blocks}
        handles = []

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                if not output.requires_grad:
                    raise LossShapeError(_NO_GRAPH)
                # The gradient edge, not the tensor: an in-place op after the layer would rebase the tensor.
                records[name].append((inputs[0].detach(), get_gradient_edge(output)))

            return hook

        try:
            for block in self.blocks:
                handles.append(block.module.register_forward_hook(make_hook(block.name)))
            with block_gradients_enabled(self.blocks):
                yield records
        finally:
            for handle in handles:
                handle.remove()


def project_matrix(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    """``R X D^T`` for ``X`` ``[..., r, d]`` and ``factors = (R, D)`` (``None``: that side kept whole)."""
    left, right = factors
    if left is not None:
        x = left.to(x) @ x
    if right is not None:
        x = x @ right.to(x).T
    return x


def _token_mask(block: Block, shape: torch.Size, mask: torch.Tensor | None, batch_index: int) -> torch.Tensor | None:
    """The padding mask ``[B, positions]`` for a block whose input has ``shape``, or None.

    The mask ``[B, T]`` applies to an input ``[B, T, ..., d]``: axis 1 is the token axis, and any
    axes between it and the features are positions of that token. An input ``[B, d]`` (a head on
    a pooled vector) has no token axis and is not masked. A token axis of another length, or a
    mask of another batch size, is an error: skipping the mask would let padding in silently.
    """
    if mask is None or len(shape) == 2:
        return None
    if mask.shape[0] == shape[0] and mask.shape[1] == shape[1]:
        per_token = math.prod(shape[2:-1])
        return mask.unsqueeze(-1).expand(-1, -1, per_token).reshape(shape[0], -1)
    raise LossShapeError(
        f"block {block.name!r} in batch {batch_index}: the padding mask has shape "
        f"{tuple(mask.shape)}, but the layer's input has shape {tuple(shape)}, so its padding "
        "positions cannot be found. The mask applies to inputs [B, T, ..., d] with the mask's "
        "[B, T]; inputs [B, d] are not masked. Fix: pass an attention_mask for the sequence the "
        "model runs on; where layers run on other sequences (a vision-language model's projector "
        "on image patches), return a hyperinf.batches.ModulePadding from Task.padding_mask "
        "(hyperinf.hf.lm.VisionLanguageTask does for LLaVA); for a layer that sees only some "
        "positions, give it a [B, d] input (index hidden[:, 0] rather than slice hidden[:, :1]) "
        "or leave the block out."
    )


def check_losses(losses: Any, *, need_graph: bool = True) -> None:
    """``loss_fn`` must return one loss per example, ``[B]`` (with an autograd graph when ``need_graph``)."""
    if not isinstance(losses, torch.Tensor):
        raise LossShapeError(f"loss_fn must return a tensor of per-example losses, got {type(losses).__name__}.")
    if losses.dim() != 1:
        raise LossShapeError(
            f"loss_fn must return per-example losses of shape [B], got shape {tuple(losses.shape)}: "
            "use reduction='none' (e.g. F.cross_entropy(logits, labels, reduction='none'))"
            + (" and do not average over the batch." if losses.dim() == 0 else ".")
        )
    if need_graph and not losses.requires_grad:
        raise LossShapeError(_NO_GRAPH)


_NO_GRAPH = (
    "loss_fn returned losses that do not depend on the selected blocks (no autograd graph): "
    "do not compute them under torch.no_grad() or detach them."
)
