"""Run by test_checkpoints.py in a subprocess: fit, score, self-influence and pairwise with checkpoints, killed by
SIGKILL at a chosen loss call.

Usage: python tests/resume_worker.py FOLDER KILL_AT   (KILL_AT = 0: never killed; writes FOLDER/result.pt)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine


def problem() -> tuple[torch.nn.Module, DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (60,), generator=g)
    return (
        model,
        DataLoader(TensorDataset(x[:48], y[:48]), batch_size=4),
        DataLoader(TensorDataset(x[48:], y[48:]), batch_size=6),
    )


def run(folder: Path, kill_at: int) -> dict[str, torch.Tensor]:
    model, train, val = problem()
    calls = 0

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    engine = InfluenceEngine(
        model, loss_fn, blocks="linear", dtype="float64", progress=False, cache_bytes=0, spill=False
    )
    engine.fit(train, methods=["exact", "kfac"], checkpoint=folder / "fit.ckpt", checkpoint_every=2)
    scored = engine.score_methods(
        train,
        val,
        ["exact", "hyperinf", "kfac"],
        self_influence="exact",
        checkpoint=folder / "score.ckpt",
        checkpoint_every=2,
    )
    own = engine.self_influence(train, method="hyperinf", checkpoint=folder / "self.ckpt", checkpoint_every=2)
    pairwise = engine.pairwise(
        train, val, method="kfac", query_chunk=5, checkpoint=folder / "pairwise.ckpt", checkpoint_every=2
    )
    return {
        **scored.scores,
        "train_loss": scored.train_loss,
        "self_influence": scored.self_influence,
        "self_influence/hyperinf": own,
        "pairwise": pairwise,
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.save(run(out, int(sys.argv[2])), out / "result.pt")
