"""What the engine knows of each kind of layer: its weight as a ``d_out x d_in`` matrix, and per position its input
and output gradient, so that every kind's per-example gradient is ``sum_p delta_p a_p^T``.

``nn.Linear``: positions are the tokens (every axis between the batch and the features).
``nn.Conv2d``: positions are the output pixels, each with the input patch it reads (``unfold``), and
the weight ``[C_out, C_in, kh, kw]`` is the matrix ``C_out x (C_in kh kw)``. Adding a kind means
adding a :class:`LayerKind` here; nothing else in the library names a layer type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from hyperinf.errors import BlockSelectionError


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's weight (every kind here has one)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


class LayerKind(ABC):
    """One kind of layer whose weight gradient is a sum over positions of output-gradient x input outer products."""

    module_type: type[nn.Module]
    masks_tokens: bool  # whether a batch's [B, T] padding mask applies to its positions

    def check(self, name: str, module: nn.Module) -> None:
        """Refuse a configuration of the layer that the position view below does not cover."""

    @abstractmethod
    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight seen as a matrix."""

    @abstractmethod
    def inputs(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The layer input as ``[B, positions, d_in]``."""

    @abstractmethod
    def output_grads(self, module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """The gradient of the loss in the layer output as ``[B, positions, d_out]``."""

    def as_matrix(self, module: nn.Module, weight_like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped ``[..., *weight.shape]`` as ``[..., d_out, d_in]``."""
        d_out, d_in = self.matrix_shape(module)
        return weight_like.reshape(*weight_like.shape[: weight_like.dim() - weight_of(module).dim()], d_out, d_in)

    def as_weight(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """``[..., d_out, d_in]`` back to ``[..., *weight.shape]``."""
        return matrix.reshape(*matrix.shape[:-2], *weight_of(module).shape)


class LinearKind(LayerKind):
    module_type = nn.Linear
    masks_tokens = True

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        d_out, d_in = weight_of(module).shape
        return d_out, d_in

    def inputs(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(a.shape[0], -1, a.shape[-1])

    def output_grads(self, module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(delta.shape[0], -1, delta.shape[-1])


class Conv2dKind(LayerKind):
    module_type = nn.Conv2d
    masks_tokens = False  # images carry no padding tokens

    def check(self, name: str, module: nn.Module) -> None:
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1 or module.padding_mode != "zeros":
            raise BlockSelectionError(
                f"block {name!r} is an nn.Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r}: "
                "hyperinf supports convolutions with groups=1 and zero padding; leave this layer out of blocks."
            )
        self._padding(name, module)

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        weight = weight_of(module)
        return weight.shape[0], weight[0].numel()

    def inputs(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, nn.Conv2d)
        patches = F.unfold(
            a,
            module.kernel_size,
            dilation=module.dilation,
            padding=self._padding("", module),
            stride=module.stride,
        )
        return patches.transpose(1, 2)  # [B, C_in kh kw, L] -> [B, L, C_in kh kw]

    def output_grads(self, module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(2).transpose(1, 2)  # [B, C_out, H', W'] -> [B, H' W', C_out]

    @staticmethod
    def _padding(name: str, module: nn.Conv2d) -> tuple[int, int]:
        """The zero padding per side: ``padding="same"`` resolved where it pads both sides alike."""
        if not isinstance(module.padding, str):
            return (int(module.padding[0]), int(module.padding[1]))
        if module.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(total % 2 for total in totals):
            raise BlockSelectionError(
                f"block {name!r} is an nn.Conv2d with padding='same' and an even kernel, which pads one side more "
                "than the other: give the padding as numbers, or leave this layer out of blocks."
            )
        return (totals[0] // 2, totals[1] // 2)


KINDS: tuple[LayerKind, ...] = (LinearKind(), Conv2dKind())
SUPPORTED = " or ".join(f"nn.{kind.module_type.__name__}" for kind in KINDS)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``, or ``None`` when hyperinf cannot attribute it."""
    return next((kind for kind in KINDS if isinstance(module, kind.module_type)), None)
