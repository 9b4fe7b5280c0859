"""`hyperinf select` killed by SIGKILL part way through its warm-up or its scoring (a real subprocess), then rerun:
it resumes, gives the scores of an uninterrupted run, and removes the killed run's spilled gradients."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pd = pytest.importorskip("pandas")

from test_select import synthetic_frame  # noqa: E402

HERE = Path(__file__).parent
# Batches of one example: 40 pool batches, checkpoints every 20 (select.CHECKPOINT_EVERY).


def worker(data_file: Path, folder: Path, kill_at: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "select_resume_worker.py"), str(data_file), str(folder), str(kill_at)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pool.csv"
    synthetic_frame().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def uninterrupted(data_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    done = worker(data_file, folder, "never")
    assert done.returncode == 0, done.stderr[-2000:]
    return pd.read_parquet(folder / "out" / "scores.parquet")


@pytest.mark.parametrize(
    ("kill_at", "resumed_after"),
    [
        ("loss:30", "fit: resuming from .* after 20 batch"),  # pass 1
        ("read:25", "score: resuming from .* after 20 batch"),  # pass 2, reading the spilled gradients
        ("warmup:25", "warm-up: resuming from .* after epoch 1, batch 20"),  # the warm-up training
    ],
)
def test_a_killed_select_resumes_with_the_uninterrupted_scores(
    data_file, tmp_path, uninterrupted, kill_at, resumed_after
):
    killed = worker(data_file, tmp_path, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "out"
    assert not (out / "scores.parquet").exists()
    if kill_at.startswith("warmup"):
        assert list((tmp_path / "cache" / "adapters").glob("*.partial.pt"))
    else:
        assert list((out / "checkpoints").glob("*.ckpt"))
        assert list((out / "spill").glob("gradients-*"))  # the killed process's gradients, left behind
    resumed = worker(data_file, tmp_path, "never")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(resumed_after, resumed.stderr), resumed.stderr[-2000:]
    frame = pd.read_parquet(out / "scores.parquet")
    assert (frame["row_id"] == uninterrupted["row_id"]).all()
    assert (frame["score"].to_numpy() == uninterrupted["score"].to_numpy()).all()  # bit for bit
    assert not (out / "checkpoints").exists() and not list((out / "spill").glob("gradients-*"))
    assert not list((tmp_path / "cache" / "adapters").glob("*.partial.pt"))
