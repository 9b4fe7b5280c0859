"""Small helpers on user batches: a tensor, a tuple/list of tensors or a dict of tensors."""

from __future__ import annotations

from collections.abc import Mapping
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


def padding_mask(batch: Any) -> torch.Tensor | None:
    """The 2-D ``attention_mask`` of a Hugging Face style batch (1 = token, 0 = padding), if any."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None
