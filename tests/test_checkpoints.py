"""Resumable passes: a run killed mid-pass resumes from its checkpoint and ends with the uninterrupted numbers."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from resume_worker import problem, run

from hyperinf import InfluenceEngine
from hyperinf.errors import CheckpointMismatchError, ResumedWarning

HERE = Path(__file__).parent
FIT_BATCHES, VAL_BATCHES = 12, 2  # of resume_worker.problem()
# Loss calls before each pass of the worker: fit, score_methods (validation, then training), self_influence,
# then pairwise's chunks of 5 queries (query batch 1 of 6 rows, chunk 0's training pass, query batch 2, chunk 1's ...).
SELF_START = FIT_BATCHES + VAL_BATCHES + FIT_BATCHES
CHUNK1_START = SELF_START + FIT_BATCHES + 1 + FIT_BATCHES + 1


def worker(folder: Path, kill_at: int) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "resume_worker.py"), str(folder), str(kill_at)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def loss_failing_at(call: int):
    """The problem's loss, raising ``RuntimeError("interrupted")`` at its ``call``-th call: a run killed mid-pass."""
    calls = []

    def loss(m, batch):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("interrupted")
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    return loss


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("whole"), kill_at=0)


@pytest.mark.parametrize(
    ("kill_at", "interrupted", "resumed_after"),
    [
        (8, "fit.ckpt", "fit: resuming from .* after 6 batch"),  # during pass 1: batches 1-7 done, checkpoint at 6
        (FIT_BATCHES + VAL_BATCHES + 5, "score.ckpt", "score: resuming from .* after 4 batch"),  # during scoring
        (SELF_START + 5, "self.ckpt", "self_influence: resuming from .* after 4 batch"),
        # pairwise: chunk 0 done (kept whole), chunk 1 killed at its 5th batch
        (
            CHUNK1_START + 5,
            "pairwise.ckpt.chunk1",
            "chunk 0: resuming from .* after 12 batch(.|\n)*chunk 1: resuming from .* after 4 batch",
        ),
    ],
)
def test_a_killed_run_resumes_and_gives_the_uninterrupted_scores(
    tmp_path, uninterrupted, kill_at, interrupted, resumed_after
):
    killed = worker(tmp_path, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / interrupted).is_file() and not (tmp_path / "result.pt").exists()
    resumed = worker(tmp_path, 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(resumed_after, resumed.stderr), resumed.stderr[-2000:]
    result = torch.load(tmp_path / "result.pt")
    assert set(result) == set(uninterrupted)
    for key, value in uninterrupted.items():
        assert torch.equal(result[key], value), key  # bit for bit: the same sums in the same order
    assert not list(tmp_path.glob("*.ckpt*"))  # a completed pass removes its checkpoint


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    model, train, val = problem()
    failing_loss = loss_failing_at(5)
    engine = InfluenceEngine(model, failing_loss, blocks="linear", dtype="float64", progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        engine.fit(train, checkpoint=tmp_path / "fit.ckpt", checkpoint_every=2)
    assert (tmp_path / "fit.ckpt").is_file()
    plain = InfluenceEngine(
        model,
        lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        blocks="linear",
        dtype="float64",
        progress=False,
    )
    with pytest.raises(CheckpointMismatchError, match="written by a run with other settings"):
        plain.fit(train, methods=["exact-fim"], checkpoint=tmp_path / "fit.ckpt")  # the flattened FIM was not summed
    weights = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(CheckpointMismatchError, match="delete it to start over"):
        plain.fit(train, checkpoint=tmp_path / "fit.ckpt")  # other weights
    with torch.no_grad():
        model[0].weight.copy_(weights)
    with pytest.warns(ResumedWarning, match="after 4 batch"):
        plain.fit(train, checkpoint=tmp_path / "fit.ckpt")
    assert not (tmp_path / "fit.ckpt").exists()


def test_a_fit_checkpoint_without_the_gfim_is_refused_by_a_method_that_needs_it(tmp_path):
    """TracIn sums no GFIM: its checkpoint cannot resume a HyperINF fit (the GFIM is part of the checkpoint's key)."""
    model, train, _ = problem()
    failing_loss = loss_failing_at(5)
    tracin = InfluenceEngine(model, failing_loss, blocks="linear", method="tracin", dtype="float64", progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        tracin.fit(train, checkpoint=tmp_path / "fit.ckpt", checkpoint_every=2)
    hyperinf = InfluenceEngine(
        model,
        lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        blocks="linear",
        method="hyperinf",
        dtype="float64",
        progress=False,
    )
    with pytest.raises(CheckpointMismatchError, match="written by a run with other settings"):
        hyperinf.fit(train, checkpoint=tmp_path / "fit.ckpt")


def test_a_self_influence_checkpoint_of_another_damping_is_refused(tmp_path):
    model, train, _ = problem()
    failing_loss = loss_failing_at(FIT_BATCHES + 5)
    engine = InfluenceEngine(
        model, failing_loss, blocks="linear", dtype="float64", progress=False, cache_bytes=0, spill=False
    ).fit(train)
    with pytest.raises(RuntimeError, match="interrupted"):
        engine.self_influence(train, checkpoint=tmp_path / "self.ckpt", checkpoint_every=2)
    other = InfluenceEngine(model, failing_loss, blocks="linear", dtype="float64", progress=False, damping=1.0).fit(
        train
    )
    with pytest.raises(CheckpointMismatchError, match="other settings"):
        other.self_influence(train, checkpoint=tmp_path / "self.ckpt")
