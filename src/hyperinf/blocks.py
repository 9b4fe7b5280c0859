"""Parameter blocks: which layers' weights are attributed, and how each gradient is laid out.

A block is one ``nn.Linear`` or ``nn.Conv2d`` (:mod:`hyperinf.layers`), its weight seen as a
``d_out x d_in`` matrix. Its per-sample gradient is an ``r x d`` matrix whose ``d x d`` Gram matrix
``g^T g`` is the block's generalized Fisher (GFIM). For a peft LoRA adapter on
``Linear(d_in -> d_out)``, ``lora_A.weight`` (``r x d_in``) is used as is and ``lora_B.weight``
(``d_out x r``) transposed, so ``d`` is always the large side. For a dense layer the ``d`` side is
a choice (``side="in"``: ``d = d_in``, the default; ``side="out"``: ``d = d_out``). A bias, when
included, is an extra input column (``d_in + 1``), as in the homogeneous-coordinate trick of K-FAC.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hyperinf.errors import BlockSelectionError, FitMismatchError
from hyperinf.layers import SUPPORTED, LayerKind, kind_of, weight_of

Side = Literal["in", "out"]
BlockSpec = str | Sequence[str]

_LORA_NAME = re.compile(r"\.lora_(A|B)\.[^.]+$")


@dataclass(frozen=True, eq=False)
class Block:
    """One layer whose weight (and optionally bias) forms an ``r x d`` gradient matrix."""

    name: str
    module: nn.Module
    side: Side
    include_bias: bool

    @property
    def kind(self) -> LayerKind:
        kind = kind_of(self.module)
        if kind is None:
            raise BlockSelectionError(f"block {self.name!r} is a {type(self.module).__name__}, not {SUPPORTED}.")
        return kind

    @property
    def weight(self) -> torch.Tensor:
        return weight_of(self.module)

    @property
    def device(self) -> torch.device:
        """Where the block's weight lives (a model split with ``device_map`` keeps each block's work beside it)."""
        return self.weight.device

    @property
    def has_bias(self) -> bool:
        return self.include_bias and self.module.bias is not None

    @property
    def shape(self) -> tuple[int, int]:
        """``(r, d)``: rows and columns of the laid-out gradient."""
        d_out, d_in = self.kind.matrix_shape(self.module)
        d_in += int(self.has_bias)
        return (d_out, d_in) if self.side == "in" else (d_in, d_out)

    @property
    def num_params(self) -> int:
        r, d = self.shape
        return r * d

    def parameters(self) -> list[torch.Tensor]:
        """The parameters this block attributes, in the order :meth:`layout` takes them."""
        bias = self.module.bias
        return [self.weight, bias] if self.has_bias and isinstance(bias, torch.Tensor) else [self.weight]

    def layout(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None = None) -> torch.Tensor:
        """Lay out gradients shaped like the parameters (``[..., *weight.shape]``, ``[..., d_out]``) as ``[..., r, d]``."""
        return self.layout_matrix(self.kind.as_matrix(self.module, weight_grad), bias_grad)

    def layout_matrix(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`layout` of a weight gradient already seen as a matrix, ``[..., d_out, d_in]``."""
        g = weight_grad
        if self.has_bias:
            if bias_grad is None:
                raise ValueError(f"block {self.name!r} includes its bias but no bias gradient was given")
            g = torch.cat([g, bias_grad.unsqueeze(-1)], dim=-1)
        return g if self.side == "in" else g.transpose(-1, -2)

    def unlayout(self, g: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`layout`: ``[..., r, d]`` back to tensors shaped like :meth:`parameters`."""
        g = g if self.side == "in" else g.transpose(-1, -2)
        weight = self.kind.as_weight(self.module, g[..., :-1] if self.has_bias else g)
        return [weight, g[..., -1]] if self.has_bias else [weight]

    def kronecker_order(self, inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kronecker factors of the inputs ``a`` and output gradients ``delta`` as ``(rows, columns)`` of the layout.

        ``g = delta a^T``: the ``delta`` side indexes the rows for ``side="in"`` (dense default,
        ``lora_A``) and the columns for ``side="out"`` (and ``lora_B``, whose input is the rank side).
        """
        return (outputs, inputs) if self.side == "in" else (inputs, outputs)


def select_blocks(
    model: nn.Module,
    spec: BlockSpec = "lora",
    *,
    side: Side = "in",
    include_bias: bool = True,
) -> list[Block]:
    """Select the blocks named by ``spec``.

    ``spec`` is ``"lora"`` (every peft ``lora_A`` / ``lora_B`` adapter), ``"linear"`` (every
    ``nn.Linear``) or a list of module names; a name of a container module (e.g. the last
    transformer layer) selects every ``nn.Linear`` and ``nn.Conv2d`` beneath it. ``side`` applies to dense layers;
    LoRA adapters always put the rank on the ``r`` side.
    """
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    if isinstance(spec, str) and spec == "lora":
        named: list[tuple[str, nn.Module]] = [
            (n, m) for n, m in model.named_modules() if _LORA_NAME.search(n) and isinstance(m, nn.Linear)
        ]
        if not named:
            raise BlockSelectionError(
                "blocks='lora' matched no module: the model has no peft LoRA adapters (lora_A / lora_B "
                "nn.Linear modules). Wrap it with peft.get_peft_model, or pass blocks='linear' or a list "
                "of module names."
            )
    elif isinstance(spec, str) and spec == "linear":
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not named:
            raise BlockSelectionError("blocks='linear' matched no module: the model has no nn.Linear layers.")
    elif isinstance(spec, str):
        raise BlockSelectionError(
            f"unknown block specification {spec!r}: use 'lora', 'linear' or a list of module names "
            "(e.g. ['classifier'])."
        )
    else:
        named = _select_by_name(model, list(spec))
    modules = dict(model.named_modules())
    blocks = [Block(n, m, _side_of(n, side), include_bias) for n, m in named if not _inactive_copy(n, modules)]
    for block in blocks:
        block.kind.check(block.name, block.module)
    return blocks


def _inactive_copy(name: str, modules: dict[str, nn.Module]) -> bool:
    """True for a module peft keeps but does not run: a wrapped head's ``original_module`` or an inactive adapter."""
    parts = name.split(".")
    for i, child in enumerate(parts):
        parent = modules.get(".".join(parts[:i]))
        if child == "original_module" and hasattr(parent, "modules_to_save"):
            return True
        active = getattr(parent, "active_adapters", None)
        if child in ("lora_A", "lora_B", "modules_to_save") and i + 1 < len(parts) and isinstance(active, list):
            if parts[i + 1] not in active:
                return True
    return False


def _side_of(name: str, dense_side: Side) -> Side:
    match = _LORA_NAME.search(name)
    if match is None:
        return dense_side
    return "in" if match.group(1) == "A" else "out"


def _select_by_name(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    if not names:
        raise BlockSelectionError(f"the list of block names is empty: name at least one {SUPPORTED} module.")
    modules = dict(model.named_modules())
    selected: dict[str, nn.Module] = {}
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise BlockSelectionError(f"no module named {name!r} in the model.{hint}")
        module = modules[name]
        layers = {f"{name}.{sub}" if sub else name: m for sub, m in module.named_modules() if kind_of(m) is not None}
        if not layers:
            raise BlockSelectionError(
                f"module {name!r} is a {type(module).__name__}, not {SUPPORTED}, and contains none: "
                f"hyperinf blocks must be {SUPPORTED} layers (or containers of them)."
            )
        selected.update(layers)
    return list(selected.items())


@contextmanager
def block_gradients_enabled(blocks: Sequence[Block]) -> Iterator[None]:
    """Make autograd track the blocks' parameters (peft freezes some), restoring the flags after."""
    saved = [(p, p.requires_grad) for b in blocks for p in b.parameters()]
    try:
        for param, _ in saved:
            param.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)


def fingerprint(blocks: Sequence[Block]) -> list[dict[str, Any]]:
    """Name, gradient layout and a SHA-256 of the weights of every block: what a fit is valid for."""
    rows = []
    for block in blocks:
        r, d = block.shape
        weights = tensor_digest(block.parameters())
        rows.append(
            {"name": block.name, "r": r, "d": d, "side": block.side, "bias": block.has_bias, "weights": weights}
        )
    return rows


def check_fingerprint(saved: list[dict[str, Any]], current: list[dict[str, Any]], what: str, redo: str) -> None:
    """Raise :class:`FitMismatchError` unless ``saved`` (a :func:`fingerprint` stored with ``what``, e.g. "the fit
    in runs/x/fit") is that of the ``current`` blocks; ``redo`` is the fix when the model changed ("fit again")."""
    saved_names, current_names = [b["name"] for b in saved], [b["name"] for b in current]
    if saved_names != current_names:
        missing = [n for n in saved_names if n not in current_names]
        extra = [n for n in current_names if n not in saved_names]
        raise FitMismatchError(
            f"{what} covers other blocks than this engine: missing here {missing or 'none'}, "
            f"not in it {extra or 'none'}. Select the same blocks, or {redo}."
        )
    for old, new in zip(saved, current):
        changed = [key for key in ("r", "d", "side", "bias") if old[key] != new[key]]
        if changed:
            raise FitMismatchError(
                f"block {old['name']!r} of {what} has {', '.join(f'{k}={old[k]!r}' for k in changed)}, "
                f"this engine's has {', '.join(f'{k}={new[k]!r}' for k in changed)}: same model and options, or {redo}."
            )
        if old["weights"] != new["weights"]:
            raise FitMismatchError(
                f"the weights of block {old['name']!r} differ from those {what} was computed on "
                f"(the model was trained or changed since): it no longer applies, so {redo}."
            )


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the raw bytes of ``tensors``, in order (any dtype, any device)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
