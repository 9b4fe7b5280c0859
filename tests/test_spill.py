"""Training gradients past the memory budget go to disk and come back bit-identical; no room means recompute."""

from __future__ import annotations

import gc
import tempfile
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import SpillWarning
from hyperinf import spill as spill_module
from hyperinf.engine import InfluenceEngine
from hyperinf.gradients import BatchGradients
from hyperinf.spill import GradientSpill


def batches(dtype: torch.dtype) -> list[BatchGradients]:
    torch.manual_seed(0)
    return [
        BatchGradients(
            torch.randn(b),
            {"a.weight": torch.randn(b, 3, 5, dtype=dtype), "b.weight": torch.randn(b, 1, 7, dtype=dtype)},
        )
        for b in (4, 4, 3)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spilled_gradients_read_back_bit_identical(tmp_path, dtype):
    written = batches(dtype)
    spill = GradientSpill(tmp_path)
    for batch in written:
        spill.append(batch)
    spill.finish()
    read = list(spill.read())
    assert len(read) == 3
    for original, back in zip(written, read):
        assert torch.equal(original.losses, back.losses)
        for name, g in original.grads.items():
            assert back.grads[name].dtype == dtype and torch.equal(back.grads[name], g)
    # Reading from a batch on (a resumed pass) gives the later batches.
    assert torch.equal(next(spill.read(skip=2)).grads["a.weight"], written[2].grads["a.weight"])
    assert spill.bytes >= sum(g.numel() * g.element_size() for b in written for g in b.grads.values())


def test_bfloat16_spill_rounds_and_halves_the_file(tmp_path):
    written = batches(torch.float32)
    full, half = GradientSpill(tmp_path), GradientSpill(tmp_path, "bfloat16")
    for batch in written:
        full.append(batch)
        half.append(batch)
    full.finish()
    half.finish()
    for original, back in zip(written, half.read()):
        for name, g in original.grads.items():
            assert back.grads[name].dtype == torch.float32
            assert torch.equal(back.grads[name], g.to(torch.bfloat16).float())
    assert half.path.stat().st_size < 0.6 * full.path.stat().st_size


def test_spill_folder_goes_with_the_object(tmp_path):
    spill = GradientSpill(tmp_path)
    spill.append(batches(torch.float32)[0])
    folder = spill.folder
    assert (folder / "gradients.bin").exists()
    del spill
    gc.collect()
    assert not folder.exists()


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = TensorDataset(torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,)))
    return model, DataLoader(data, batch_size=8), DataLoader(TensorDataset(*data[:10]), batch_size=4)


def test_engine_spills_past_the_budget_and_scores_as_in_memory(setup, tmp_path):
    model, train, val = setup
    calls = []

    def counting_loss(m, batch):
        calls.append(len(batch[1]))
        return loss_fn(m, batch)

    options = {"blocks": "linear", "progress": False, "dtype": "float64"}
    in_memory = InfluenceEngine(model, loss_fn, **options).fit(train, methods=["datainf"])
    spilled = InfluenceEngine(model, counting_loss, cache_bytes=1000, spill_dir=tmp_path, **options).fit(
        train, methods=["datainf"]
    )
    assert in_memory.gradient_store == "memory" and spilled.gradient_store == "disk"
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / "gradients.bin").stat().st_size >= spilled.gradient_bytes
    calls.clear()
    expected = in_memory.score_methods(train, val, ["hyperinf", "datainf", "tracin"], self_influence="exact")
    got = spilled.score_methods(train, val, ["hyperinf", "datainf", "tracin"], self_influence="exact")
    assert sum(calls) == 10  # the validation pass only: the training gradients came from disk
    for method in ("hyperinf", "datainf", "tracin"):
        assert torch.equal(expected[method], got[method])
    assert torch.equal(expected.self_influence, got.self_influence)
    spilled.fit(train)  # a new fit replaces the old spill
    assert len(list(tmp_path.iterdir())) == 1 and not folders[0].exists()
    del spilled
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_no_disk_room_warns_and_recomputes(setup, tmp_path, monkeypatch):
    model, train, val = setup
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(spill_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    engine = InfluenceEngine(
        model, loss_fn, blocks="linear", progress=False, dtype="float64", cache_bytes=1000, spill_dir=tmp_path
    )
    with pytest.warns(SpillWarning, match=r"not enough disk space .* GiB needed"):
        engine.fit(train)
    assert engine.gradient_store is None and list(tmp_path.iterdir()) == []
    reference = InfluenceEngine(model, loss_fn, blocks="linear", progress=False, dtype="float64").fit(train)
    torch.testing.assert_close(engine.score(train, val), reference.score(train, val), rtol=1e-12, atol=0)


def test_a_write_that_fails_deletes_the_spill_and_recomputes(setup, tmp_path, monkeypatch):
    model, train, val = setup
    append = GradientSpill.append
    written = []

    def full_disk(self, batch):
        if written:
            raise OSError(28, "No space left on device")
        written.append(1)
        append(self, batch)

    monkeypatch.setattr(GradientSpill, "append", full_disk)
    engine = InfluenceEngine(
        model, loss_fn, blocks="linear", progress=False, dtype="float64", cache_bytes=0, spill_dir=tmp_path
    )
    with pytest.warns(SpillWarning, match="No space left on device"):
        engine.fit(train)
    assert engine.gradient_store is None and list(tmp_path.iterdir()) == []
    reference = InfluenceEngine(model, loss_fn, blocks="linear", progress=False, dtype="float64").fit(train)
    torch.testing.assert_close(engine.score(train, val), reference.score(train, val), rtol=1e-12, atol=0)


def test_spill_options_are_checked_and_the_default_folder_is_the_temporary_directory():
    with pytest.raises(ValueError, match="spill_dtype must be one of"):
        InfluenceEngine(nn.Linear(2, 2), loss_fn, blocks="linear", spill_dtype="float16")
    assert (
        InfluenceEngine(nn.Linear(2, 2), loss_fn, blocks="linear").config.runtime.spill_folder == tempfile.gettempdir()
    )
    assert InfluenceEngine(nn.Linear(2, 2), loss_fn, blocks="linear", spill=False).config.runtime.spill_folder is None
