"""The one place where experiments fine-tune a model: seeded, cached by a key of its settings and data.

Every experiment that trains (mislabel detection, data selection, retraining ground truth) calls
:func:`train_or_load` with a per-example loss, the examples and a key from :func:`training_key`.
The same key gives the same trainable weights on the same thread count: data order, dropout and
the optimizer are seeded (another thread count adds torch's reductions in another order, and the
weights differ slightly: hyperinf.paper.analysis.retrain_threads), and the result is cached as safetensors
(written atomically) so a rerun or an interrupted run trains only what is missing. A long
training also checkpoints itself next to that file every :data:`CHECKPOINT_STEPS` optimizer
steps (weights, optimizer, data order and random state): a run killed part way resumes there
and ends with the weights of an uninterrupted one. Training can continue from another run's
weights (a warm-up): load them with :func:`load_trainable` first and put the warm-up's key in
the new key's settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hyperinf.errors import ConfigurationError, EmptyDataError, ResumedWarning
from hyperinf.results import atomic_write

TRAINING_REVISION = 2  # part of every cache key: bump when train_or_load trains differently (2: seeded dropout)
CHECKPOINT_STEPS = 200  # optimizer steps between checkpoints of a training

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_cache_dir() -> Path:
    """``$HYPERINF_CACHE/adapters`` (default ``~/.cache/hyperinf/adapters``): where trained weights are cached."""
    return Path(os.environ.get("HYPERINF_CACHE", Path.home() / ".cache" / "hyperinf")) / "adapters"


def training_key(settings: Mapping[str, Any], examples: Iterable[Any]) -> str:
    """Hash of everything that determines the trained weights: the settings and the examples in order, each a
    ``(text, label)`` pair or an encoded example (a dict of token ids, :mod:`hyperinf.hf.formats`)."""
    digest = hashlib.sha256(
        json.dumps({**settings, "training_revision": TRAINING_REVISION}, sort_keys=True, default=str).encode()
    )
    for example in examples:
        if isinstance(example, dict):
            digest.update((json.dumps(example, sort_keys=True) + "\n").encode())
        else:
            text, label = example
            digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:20]


def trained_path(cache_dir: Path, key: str) -> Path:
    """Where :func:`train_or_load` keeps the weights trained under ``key`` (from :func:`training_key`)."""
    return cache_dir / f"{key}.safetensors"


@dataclass(frozen=True)
class Schedule:
    """How long and how fast to train: AdamW (no weight decay) over shuffled batches."""

    epochs: int
    lr: float
    batch_size: int
    seed: int


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters that require grad (what training changes and the cache stores)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "the given state") -> None:
    """Copy ``state`` into the model's trainable parameters; they must match by name."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(trainable):
        raise ConfigurationError(
            f"{source} does not match the model's trainable parameters ({len(state)} vs {len(trainable)} tensors): "
            "delete the cached file (or pass another --cache-dir)"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            trainable[name].copy_(tensor)


def train_or_load(
    model: nn.Module,
    loss_fn: LossFn,
    examples: Sequence[tuple[str, int]],
    collate: Callable[[Sequence[Any]], Any],
    schedule: Schedule,
    path: Path,
    *,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Fine-tune the model's trainable parameters on ``examples`` (mean of ``loss_fn``), or load them from ``path``.

    Returns ``{"cached", "path", "seconds", "final_loss"}``; the model is left in eval mode. An
    interrupted training resumes from ``<path stem>.partial.pt`` (a :class:`ResumedWarning` says from where).
    """
    if path.exists():
        from safetensors.torch import load_file

        load_trainable(model, load_file(str(path)), f"cached weights {path}")
        return {"cached": True, "path": str(path), "seconds": 0.0, "final_loss": None}
    if len(examples) == 0:
        raise EmptyDataError("nothing to train on: the training set is empty")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(schedule.seed)
    loader = DataLoader(
        list(examples), batch_size=schedule.batch_size, shuffle=True, generator=generator, collate_fn=collate
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)
    partial = path.with_name(f"{path.stem}.partial.pt")
    loss = torch.tensor(float("nan"))
    model.train()
    # Dropout draws from the global generator: seed it (and leave the caller's state alone) so
    # the same settings give the same weights, as the cache key promises.
    with (
        torch.random.fork_rng(devices=[]),
        tqdm(total=schedule.epochs * len(loader), desc=desc, disable=not progress, leave=False) as bar,
    ):
        torch.manual_seed(schedule.seed)
        first_epoch, skip = _resume(partial, model, optimizer, generator, desc)
        bar.update(first_epoch * len(loader) + skip)
        for epoch in range(first_epoch, schedule.epochs):
            order = (
                generator.get_state()
            )  # the epoch's shuffle (and loader seed) are drawn from here when iteration starts
            for step, batch in enumerate(loader, start=1):
                if step <= skip:
                    continue
                optimizer.zero_grad()
                loss = loss_fn(model, batch).mean()
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                done = epoch * len(loader) + step
                if done % CHECKPOINT_STEPS == 0 and done < schedule.epochs * len(loader):
                    _checkpoint(partial, model, optimizer, epoch, step, order)
            skip = 0
    model.eval()
    from safetensors.torch import save_file

    state = {n: t.contiguous() for n, t in trainable_state(model).items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    partial.unlink(missing_ok=True)
    return {
        "cached": False,
        "path": str(path),
        "seconds": time.perf_counter() - start,
        "final_loss": float(loss.detach()),
    }


def _checkpoint(
    partial: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int, order: torch.Tensor
) -> None:
    """Write what resuming after ``step`` batches of ``epoch`` needs: weights, optimizer, the epoch's data order, the random state."""
    payload = {
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "order": order,
        "rng": torch.get_rng_state(),
    }
    atomic_write(partial, lambda tmp: torch.save(payload, tmp))


def _resume(
    partial: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, desc: str
) -> tuple[int, int]:
    """Restore an interrupted training from ``partial``: ``(epoch, batches of it done)``, ``(0, 0)`` without one.
    (The file sits beside the cache file named by the key of every setting, so it cannot belong to another run.)"""
    if not partial.exists():
        return 0, 0
    payload = torch.load(partial, weights_only=True)
    load_trainable(model, payload["trainable"], f"the training checkpoint {partial}")
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])
    epoch, step = payload["epoch"], payload["step"]
    generator.set_state(payload["order"])
    warnings.warn(
        f"{desc}: resuming from {partial} after epoch {epoch + 1}, batch {step}", ResumedWarning, stacklevel=3
    )
    return epoch, step
