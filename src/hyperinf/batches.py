"""Small helpers on user batches: a tensor, a tuple/list of tensors or a dict of tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in ``batch`` (nested dicts, lists and tuples) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass(frozen=True)
class ModulePadding:
    """Padding masks of a batch whose layers run on different sequences, e.g. a vision-language model's text
    (``sequence``, ``[B, T]``) and image patches (its projector's input: no padding).

    ``modules`` maps a module name (one or more dotted parts, e.g. ``"multi_modal_projector"``) to the mask
    of the sequence the layers beneath it see (``None``: no padding): a block whose dotted name holds those
    parts, whole and in order, takes that mask; every other block ``sequence``. A :class:`hyperinf.Task`
    returns it from ``padding_mask``."""

    sequence: torch.Tensor | None
    modules: Mapping[str, torch.Tensor | None] = field(default_factory=dict)

    def for_block(self, name: str) -> torch.Tensor | None:
        """The mask of the sequence the block ``name`` runs on."""
        dotted = f".{name}."
        return next((mask for module, mask in self.modules.items() if f".{module}." in dotted), self.sequence)


def padding_mask(batch: Any) -> torch.Tensor | None:
    """The 2-D ``attention_mask`` of a Hugging Face style batch (1 = token, 0 = padding), if any."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None
