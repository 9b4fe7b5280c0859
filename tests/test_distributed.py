"""torch.distributed: scores and pairwise from real torchrun processes, each on its shard, equal one process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_problem import METHODS, OPTIONS, loss_fn, problem
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine
from hyperinf.distributed import shard
from hyperinf.errors import EmptyDataError, FitMismatchError
from hyperinf.index import GradientIndex

HERE = Path(__file__).parent


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest entry error relative to the largest entry."""
    return float((actual - expected).abs().max() / expected.abs().max())


def torchrun(processes: int, script: str, *args: object) -> None:
    """Run ``script`` (in this folder) on ``processes`` local processes; fail with its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        str(HERE / script),
        *map(str, args),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]


@pytest.mark.parametrize("processes", [2, 3])
def test_torchrun_shards_give_the_single_process_scores_and_pairwise(tmp_path, processes):
    out = tmp_path / "scores.pt"
    torchrun(processes, "distributed_worker.py", out)
    together = torch.load(out)

    model, train, val = problem()
    loader = DataLoader(train, batch_size=7)
    engine = InfluenceEngine(model, loss_fn, **OPTIONS).fit(loader, methods=METHODS)
    alone = dict(engine.score_methods(loader, DataLoader(val, batch_size=5), METHODS, self_influence="exact"))
    alone["self-influence"] = engine.self_influence(loader, method="exact")
    with torch.no_grad():
        alone["train_loss"] = loss_fn(model, train.tensors)
    for method in METHODS:
        alone[f"pairwise/{method}"] = engine.pairwise(loader, DataLoader(val, batch_size=5), method=method)
    assert set(together) == set(alone)
    # float64 sums over shards in another order: every entry measured within 5e-16 of the largest (kfac, ekfac:
    # 1.0e-15, their eigenbases of factors summed in another order).
    # Schulz (hyperinf, hyperinf-fim) is held to its stopping tolerance, 1.8e-12, the rest to 1e-13.
    errors = {key: relative_error(together[key], alone[key]) for key in alone}
    assert all(error <= (1e-11 if "hyperinf" in key else 1e-13) for key, error in errors.items()), errors
    for method in METHODS:
        assert together[f"pairwise/{method}"].shape == (len(train), len(val))


def test_shard_is_contiguous_covers_the_data_and_refuses_too_few_examples():
    data = TensorDataset(torch.arange(10))
    pieces = [list(shard(data, rank=r, world_size=3).indices) for r in range(3)]
    assert sum(pieces, []) == list(range(10)) and [len(p) for p in pieces] == [3, 3, 4]
    with pytest.raises(EmptyDataError, match="2 examples cannot be shared by 3 processes"):
        shard(TensorDataset(torch.arange(2)), rank=0, world_size=3)


def test_distributed_without_a_process_group_says_how_to_start_one():
    model, _, _ = problem()
    with pytest.raises(RuntimeError, match="torchrun.*init_process_group"):
        InfluenceEngine(model, loss_fn, blocks="linear", distributed=True)


def test_an_index_built_in_shards_opens_as_the_single_process_index(tmp_path):
    """Each torchrun process indexes its shard and gets the whole index back (index_worker.py checks); the folder
    opens as one index equal to one process's, in data-set order, curvature and Kronecker factors summed; a folder
    that also holds a one-process index, or misses a shard, is refused."""
    torchrun(2, "index_worker.py", tmp_path / "shards", 12)
    together = GradientIndex.open(tmp_path / "shards")
    model, train, val = problem()
    engine = InfluenceEngine(model, loss_fn, **OPTIONS)
    loader = DataLoader(train, batch_size=7)
    alone = GradientIndex.build(engine, loader, tmp_path / "alone", dim=12, storage="float32", kronecker=True)
    assert torch.equal(together.ids, alone.ids) and torch.equal(together.ids, torch.arange(len(train)))
    torch.testing.assert_close(together.rows * together.norms[:, None], alone.rows * alone.norms[:, None])
    assert together.kronecker is not None and alone.kronecker is not None
    assert together.kronecker.count == alone.kronecker.count == len(train)
    for sums in ("curvature", "kronecker"):
        for mine, theirs in zip(getattr(together, sums).tensors(), getattr(alone, sums).tensors()):
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=0)
    queries = DataLoader(val, batch_size=5)
    for method in ("exact", "ekfac"):
        torch.testing.assert_close(
            together.pairwise(engine, queries, method=method), alone.pairwise(engine, queries, method=method)
        )
    shutil.copy(tmp_path / "alone" / "index.json", tmp_path / "shards" / "index.json")
    with pytest.raises(FitMismatchError, match="holds both an index and per-process index shards"):
        GradientIndex.open(tmp_path / "shards")
    (tmp_path / "shards" / "index.json").unlink()
    shutil.rmtree(tmp_path / "shards" / "shard-00001")
    with pytest.raises(FitMismatchError, match=r"holds the index shards of ranks \[0\], not all 2"):
        GradientIndex.open(tmp_path / "shards")
