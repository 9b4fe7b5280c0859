"""The engine's contract beyond the numbers: bad input, caching, saving, model state."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import (
    DeadBlockWarning,
    EmptyDataError,
    LossShapeError,
    NonFiniteGradientError,
    NotFittedError,
)
from hyperinf.engine import InfluenceEngine
from hyperinf.results import load_scores


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    data = TensorDataset(torch.randn(30, 4), torch.randint(0, 3, (30,)))
    return model, DataLoader(data, batch_size=8), DataLoader(TensorDataset(*data[:10]), batch_size=4)


def engine_of(model, **kw):
    return InfluenceEngine(model, loss_fn, blocks="linear", progress=False, **kw)


def test_empty_train_loader_is_named(setup):
    model, _, _ = setup
    empty = DataLoader(TensorDataset(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(EmptyDataError, match="train_loader yielded no examples"):
        engine_of(model).fit(empty)


def test_empty_val_loader_is_named(setup):
    model, train, _ = setup
    empty = DataLoader(TensorDataset(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=4)
    engine = engine_of(model).fit(train)
    with pytest.raises(EmptyDataError, match="val_loader yielded no examples"):
        engine.score(train, empty)


def test_scalar_loss_is_rejected(setup):
    model, train, _ = setup
    engine = InfluenceEngine(model, lambda m, b: loss_fn(m, b).mean(), blocks="linear", progress=False)
    with pytest.raises(LossShapeError, match=r"reduction='none'"):
        engine.fit(train)


def test_nan_gradient_names_block_and_batch(setup):
    model, _, _ = setup
    x = torch.randn(12, 4)
    x[9, 2] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.zeros(12, dtype=torch.long)), batch_size=4)
    with pytest.raises(NonFiniteGradientError, match=r"block '0' in batch 2"):
        engine_of(model).fit(loader)


def test_shuffled_loader_is_rejected(setup):
    model, train, _ = setup
    shuffled = DataLoader(train.dataset, batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        engine_of(model).fit(shuffled)


def test_score_before_fit_and_missing_curvature(setup):
    model, train, val = setup
    engine = engine_of(model)
    with pytest.raises(NotFittedError, match="call fit"):
        engine.score(train, val)
    engine.fit(train)
    with pytest.raises(NotFittedError, match=r"methods=\['exact-fim'\]"):
        engine.score(train, val, method="exact-fim")


def test_unknown_method_and_oversized_fim(setup):
    model, train, _ = setup
    with pytest.raises(ValueError, match="unknown method 'schulz'"):
        engine_of(model, method="schulz")
    with pytest.raises(ValueError, match="fim_max_params"):
        engine_of(model, fim_max_params=10).fit(train, methods=["exact-fim"])


def test_cache_is_used_and_budget_respected(setup, monkeypatch):
    model, train, val = setup
    cached = engine_of(model).fit(train)
    assert cached.gradients_cached
    per_example = sum(b.num_params for b in cached.blocks) * 4  # float32
    assert cached.gradient_bytes == 30 * per_example
    uncached = engine_of(model, cache_bytes=100, spill=False).fit(train)
    assert not uncached.gradients_cached and uncached.gradient_bytes == 30 * per_example
    torch.testing.assert_close(cached.score(train, val), uncached.score(train, val))
    # With the cache, pass 2 over the training set computes no new gradients.
    calls = []
    original = cached.gradients.__call__
    monkeypatch.setattr(type(cached.gradients), "__call__", lambda self, *a, **k: calls.append(1) or original(*a, **k))
    cached.score(train, val)
    assert len(calls) == len(list(val))


def test_the_gradient_plan_foretells_what_fit_keeps(setup, tmp_path):
    """Before pass 1: the bytes fit will measure, and where the gradients will go."""
    model, train, _ = setup
    layouts = {(6, 5): 1, (3, 7): 1}  # Linear(4 -> 6) and Linear(6 -> 3), the bias as one more input column
    for options, store, kept in (
        ({}, "kept in memory", "memory"),
        ({"cache_bytes": 100, "spill_dir": str(tmp_path)}, f"written to {tmp_path}", "disk"),
        ({"cache_bytes": 100, "spill": False}, "recomputed in pass 2", None),
        ({"dtype": "float64"}, "kept in memory", "memory"),
    ):
        engine = engine_of(model, **options)
        plan = engine.gradient_plan(30)
        assert plan.shapes == layouts and plan.parameters == 51 and store in plan.describe()[1]
        engine.fit(train)
        assert plan.bytes == engine.gradient_bytes and engine.gradient_store == kept


def test_model_state_is_restored(setup):
    model, train, val = setup
    model.train()
    for p in model[0].parameters():
        p.requires_grad_(False)
    engine_of(model).fit(train).score(train, val)
    assert model.training
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.grad is None for p in model.parameters())


def test_save_writes_scores_arguments_and_diagnostics(setup, tmp_path):
    model, train, val = setup
    engine = engine_of(model).fit(train)
    scores = engine.score(train, val)
    self_scores = engine.self_influence(train)
    out = engine.save(tmp_path / "run")
    saved = load_scores(out)
    assert torch.equal(saved["score/hyperinf"], scores) and torch.equal(saved["self_influence/hyperinf"], self_scores)
    arguments = json.loads((out / "arguments.json").read_text())
    assert arguments["method"] == "hyperinf" and arguments["n_train"] == 30
    assert [b["name"] for b in arguments["selected_blocks"]] == ["0", "2"]
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert {d["block"] for d in diagnostics} == {"0", "2"} and all(d["converged"] for d in diagnostics)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_failed_save_leaves_no_partial_file(setup, tmp_path, monkeypatch):
    model, train, val = setup
    engine = engine_of(model).fit(train)
    engine.score(train, val)

    def broken(tensors, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("hyperinf.results.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        engine.save(tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []


def test_score_methods_equals_single_method_scores(setup):
    model, train, val = setup
    engine = engine_of(model).fit(train, methods=["exact", "tracin", "datainf"])
    together = engine.score_methods(train, val, ["hyperinf", "exact", "tracin", "datainf"])
    for method, scores in together.items():
        torch.testing.assert_close(scores, engine_of(model, method=method).fit(train).score(train, val))
    assert set(engine.ihvp_seconds) == set(together)


def test_ihvp_seconds_include_datainfs_pass_over_the_training_gradients(setup):
    """DataInf's h needs a pass over the training gradients, recomputed here (no cache) through a loss that
    sleeps: its time holds that pass (4 batches), TracIn's (h = v) holds none of it."""
    model, train, val = setup
    delay = 0.05
    sleeping = [False]

    def slow_loss(m, batch):
        if sleeping[0]:
            time.sleep(delay)
        return loss_fn(m, batch)

    engine = InfluenceEngine(model, slow_loss, blocks="linear", progress=False, cache_bytes=0, spill=False)
    engine.fit(train, methods=["datainf"])
    sleeping[0] = True
    engine.score_methods(train, val, ["tracin", "datainf"])
    assert engine.ihvp_seconds["datainf"] >= len(train) * delay, engine.ihvp_seconds
    assert engine.ihvp_seconds["tracin"] < delay, engine.ihvp_seconds  # measured 7e-5 s


def test_score_methods_gives_self_influence_and_losses_in_the_same_training_pass(setup):
    model, train, val = setup
    calls = []

    def counting_loss(m, batch):
        calls.append(len(batch[1]))
        return loss_fn(m, batch)

    engine = InfluenceEngine(model, counting_loss, blocks="linear", progress=False, cache_bytes=0, spill=False).fit(
        train
    )
    calls.clear()
    scored = engine.score_methods(train, val, ["hyperinf", "tracin"], self_influence="exact")
    assert sum(calls) == 30 + 10  # one training pass and one validation pass, nothing recomputed twice
    x, y = train.dataset.tensors
    with torch.no_grad():
        torch.testing.assert_close(scored.train_loss, loss_fn(model, (x, y)))
    torch.testing.assert_close(scored.self_influence, engine_of(model, method="exact").fit(train).self_influence(train))
    assert torch.equal(engine.results["self_influence/exact"], scored.self_influence)  # kept for save()
    with pytest.raises(NotImplementedError, match="self-influence with 'datainf'"):
        engine.score_methods(train, val, ["tracin"], self_influence="datainf")


@pytest.mark.parametrize("method", ["hyperinf", "exact", "datainf", "lissa", "tracin"])
def test_block_without_gradient_is_named_and_adds_nothing(setup, method):
    """Like a fresh peft adapter (lora_B = 0 leaves lora_A without gradient): finite scores, a warning."""
    model, train, val = setup
    with torch.no_grad():
        model[2].weight.zero_()  # block "0" now gets no gradient from any example
    engine = engine_of(model, method=method)
    with pytest.warns(DeadBlockWarning, match=r"block\(s\) 0 have zero gradient"):
        engine.fit(train)
    scores = engine.score(train, val)
    live_only = (
        InfluenceEngine(model, loss_fn, blocks=["2"], method=method, progress=False).fit(train).score(train, val)
    )
    torch.testing.assert_close(scores, live_only)


def test_single_use_and_distributed_shuffling_loaders_are_rejected(setup):
    from torch.utils.data.distributed import DistributedSampler

    from hyperinf.errors import DataOrderError

    model, train, _ = setup
    with pytest.raises(DataOrderError, match="single-use iterator .*generator"):
        engine_of(model).fit(batch for batch in train)
    sampler = DistributedSampler(train.dataset, num_replicas=2, rank=0, shuffle=True)
    with pytest.raises(DataOrderError, match=r"shuffle=False .*DistributedSampler"):
        engine_of(model).fit(DataLoader(train.dataset, batch_size=8, sampler=sampler))
    ordered = DistributedSampler(train.dataset, num_replicas=2, rank=0, shuffle=False)
    engine_of(model).fit(DataLoader(train.dataset, batch_size=8, sampler=ordered))


def test_results_are_read_only(setup):
    model, train, val = setup
    engine = engine_of(model).fit(train)
    engine.score(train, val)
    with pytest.raises(TypeError):
        engine.results["score/hyperinf"] = torch.zeros(30)


def test_build_time_is_counted_once_in_ihvp_seconds(setup, monkeypatch):
    """A fake clock: building the inverse takes 100 s, applying it 1 s; only the first call pays the build."""
    from types import SimpleNamespace

    model, train, val = setup
    engine = engine_of(model).fit(train)
    ticks = {"fitted": 0.0, "engine": 0.0}

    def clock(name, step):
        def tick():
            ticks[name] += step  # each interval is two readings apart: it lasts one step
            return ticks[name]

        return SimpleNamespace(perf_counter=tick)

    monkeypatch.setattr("hyperinf.fitted.time", clock("fitted", 100.0))
    monkeypatch.setattr("hyperinf.engine.time", clock("engine", 1.0))
    engine.score(train, val)
    assert engine.ihvp_seconds["hyperinf"] == pytest.approx(101.0)
    engine.score(train, val)
    assert engine.ihvp_seconds["hyperinf"] == pytest.approx(1.0)
