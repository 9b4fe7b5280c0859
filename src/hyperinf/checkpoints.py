"""Resumable passes over the data: a pass's partial sums, written atomically every few batches, read back to go on.

A checkpoint is one safetensors file: the partial tensors, and in its metadata how many batches
they cover and the settings of the run that wrote them. A rerun with the same settings continues
after those batches and, since every batch is added in the same order, ends with the same
numbers as a run that was never interrupted; a rerun with other settings is refused rather than
mixing two runs. The file goes once its pass completes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hyperinf.blocks import Block, fingerprint, tensor_digest
from hyperinf.config import InfluenceConfig
from hyperinf.distributed import per_process
from hyperinf.errors import CheckpointMismatchError, ResumedWarning
from hyperinf.methods import Method
from hyperinf.results import atomic_write


class PassCheckpoint:
    """The checkpoint of one pass at ``path``, written every ``every`` batches, valid for ``settings``."""

    def __init__(self, path: str | Path, settings: Mapping[str, Any], every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 batch, got {every}")
        self.path = Path(path)
        self.settings = json.dumps(settings, sort_keys=True, default=str)
        self.every = every

    def resume(self, what: str) -> tuple[int, dict[str, torch.Tensor]]:
        """``(batches done, partial tensors)`` of an earlier run with these settings; ``(0, {})`` if none."""
        if not self.path.is_file():
            return 0, {}
        with safe_open(str(self.path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if meta.get("settings") != self.settings:
            raise CheckpointMismatchError(
                f"the checkpoint {self.path} was written by a run with other settings "
                f"(its: {meta.get('settings')}; this run: {self.settings}): delete it to start over, "
                "or pass another checkpoint path."
            )
        batches = int(meta["batches"])
        warnings.warn(f"{what}: resuming from {self.path} after {batches} batch(es)", ResumedWarning, stacklevel=3)
        return batches, tensors

    def save(self, batches: int, tensors: Callable[[], Mapping[str, torch.Tensor]], *, force: bool = False) -> None:
        """Write the state after ``batches`` batches when a checkpoint is due, or now with ``force``
        (``tensors`` is called only then)."""
        if batches % self.every and not force:
            return
        state = {name: t.detach().cpu().contiguous().clone() for name, t in tensors().items()}
        meta = {"batches": str(batches), "settings": self.settings}
        atomic_write(self.path, lambda tmp: save_file(state, str(tmp), metadata=meta))

    def finish(self) -> None:
        """The pass completed: its checkpoint is no longer needed."""
        self.path.unlink(missing_ok=True)


def fit_checkpoint(
    path: str | Path,
    every: int,
    blocks: Sequence[Block],
    config: InfluenceConfig,
    methods: Sequence[Method],
    loader: Any,
) -> PassCheckpoint:
    """The checkpoint of pass 1 (one file per process when distributed), valid for the same blocks and
    weights, layout, curvature kinds and loader length."""
    settings = {
        "pass": "fit",
        "blocks": fingerprint(blocks),
        "fit": asdict(config.fit),
        "needs": sorted({kind for m in methods for kind in m.needs()}),
        "batches": len(loader) if hasattr(loader, "__len__") else None,
    }
    return PassCheckpoint(per_process(path, config.runtime.distributed), settings, every)


def score_checkpoint(
    path: str | Path,
    every: int,
    blocks: Sequence[Block],
    config: InfluenceConfig,
    directions: Mapping[str, torch.Tensor],
    columns: Sequence[str],
    self_influence: str | None,
    loader: Any,
) -> PassCheckpoint:
    """The checkpoint of a scoring pass: valid for the same weights, directions ``h`` (so the same curvature,
    damping and validation set), score columns, self-influence method and loader length."""
    settings = {
        "pass": "score",
        "blocks": fingerprint(blocks),
        "directions": tensor_digest(directions[name] for name in sorted(directions)),
        "columns": list(columns),
        "self_influence": self_influence,
        "batches": len(loader) if hasattr(loader, "__len__") else None,
    }
    return PassCheckpoint(per_process(path, config.runtime.distributed), settings, every)
