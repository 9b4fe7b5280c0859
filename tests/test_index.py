"""The gradient index (:mod:`hyperinf.index`) against explicit solves: whole, it gives the exact scores; projected,
unbiased estimates whose error falls with the dimension. Builds resume; other weights and settings are refused.

The model, data and references are test_pairwise's: looped single-example gradients and explicit solves.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_pairwise import DAMPING, N_QUERY, N_TRAIN, assert_agree, loss_fn, query_loader, reference_pairwise
from test_pairwise import setup as pairwise_setup

import hyperinf.index
from hyperinf import CheckpointMismatchError, ConfigurationError, FitMismatchError, InfluenceEngine
from hyperinf.index import GradientIndex, plan_layout

WHOLE = ["hyperinf", "exact", "exact-fim", "exact-hessian", "tracin", "kfac", "ekfac"]
REFERENCE_OF = {"hyperinf": "exact"}


def build(tmp_path, name="index", **options):
    engine, _, _, loader = pairwise_setup()
    return GradientIndex.build(engine, loader, tmp_path / name, **options)


@pytest.mark.parametrize("method", WHOLE)
def test_a_whole_index_gives_the_exact_pairwise_scores(tmp_path, method):
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=0, method=method, storage="float32", chunk_batches=2)
    assert len(index) == N_TRAIN and index.projection.dim == sum(b.num_params for b in engine.blocks)
    scores = index.pairwise(engine, query_loader())
    assert scores.shape == (N_TRAIN, N_QUERY)
    assert_agree(scores.double(), reference_pairwise(REFERENCE_OF.get(method, method)), 1e-6)


def test_top_k_from_the_index_is_the_reference_ranking(tmp_path):
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=0, method="exact", storage="float32", row_ids=range(100, 100 + N_TRAIN))
    top = index.top_k(engine, query_loader(), k=3)
    reference = reference_pairwise("exact")
    assert torch.equal(top.helpful, reference.topk(3, dim=0, largest=False).indices.T)
    assert torch.equal(top.harmful, reference.topk(3, dim=0).indices.T)
    assert torch.equal(index.ids[top.helpful], top.helpful + 100)


def test_the_cosine_option_scores_minus_the_cosine(tmp_path):
    engine, train, queries, _ = pairwise_setup()
    index = build(tmp_path, dim=0, method="tracin", storage="float32")
    cosine = index.pairwise(engine, query_loader(), normalize=True)
    from models import reference_gradients, split_examples

    g = reference_gradients(engine.model, loss_fn, split_examples(train.tensors), engine.blocks)
    q = reference_gradients(engine.model, loss_fn, split_examples(queries.tensors), engine.blocks)
    flat_g = torch.cat([t.reshape(N_TRAIN, -1) for t in g.values()], 1)
    flat_q = torch.cat([t.reshape(N_QUERY, -1) for t in q.values()], 1)
    expected = -torch.nn.functional.normalize(flat_g, dim=1) @ torch.nn.functional.normalize(flat_q, dim=1).T
    assert_agree(cosine.double(), expected, 1e-6)


def test_projected_scores_are_unbiased_and_their_error_falls_with_the_dimension(tmp_path):
    """Over 60 projection seeds the mean score is the exact one; one seed's error shrinks as ``dim`` grows."""
    engine = pairwise_setup()[0]
    exact = reference_pairwise("exact")
    scale = exact.abs().max()
    errors, means = {}, {}
    for dim in (6, 12, 24):
        runs = torch.stack(
            [
                build(tmp_path, f"d{dim}s{seed}", dim=dim, seed=seed, method="exact", storage="float32")
                .pairwise(engine, query_loader())
                .double()
                for seed in range(60)
            ]
        )
        errors[dim] = float((runs - exact).square().mean().sqrt() / scale)
        means[dim] = float((runs.mean(0) - exact).square().mean().sqrt() / scale)
    assert errors[6] > errors[12] > errors[24] > 0.05, errors  # projected: not exact
    for dim, error in means.items():  # unbiased: 60 draws average to ~1/sqrt(60) = 0.13 of one draw's error
        assert error < 0.25 * errors[dim], (means, errors)


def test_the_projection_seed_fixes_the_index_and_is_recorded(tmp_path):
    a = build(tmp_path, "a", dim=12, seed=3)
    b = build(tmp_path, "b", dim=12, seed=3)
    c = build(tmp_path, "c", dim=12, seed=4)
    assert torch.equal(a.rows, b.rows) and not torch.equal(a.rows, c.rows)
    assert a.meta["seed"] == 3 and a.meta["dim"] == 12 and a.meta["method"] == "hyperinf"


def test_the_layout_splits_the_dimension_over_blocks_by_size():
    engine = pairwise_setup()[0]
    whole = plan_layout(engine.blocks, 0)
    assert [(x.k_r, x.k_d) for x in whole] == [b.shape for b in engine.blocks]  # [5 x 5], [3 x 6]
    small = plan_layout(engine.blocks, 12)  # shares 25/43 and 18/43 of 12: 7 and 5
    assert [(x.k_r, x.k_d) for x in small] == [(2, 3), (2, 2)]
    with pytest.raises(ValueError, match="dim must be >= 0"):
        plan_layout(engine.blocks, -1)


def test_stored_float16_rows_keep_scores_to_float16_precision(tmp_path):
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=0, method="exact")  # the default storage
    assert index.meta["storage"] == "float16"
    assert_agree(index.pairwise(engine, query_loader()).double(), reference_pairwise("exact"), 2e-3)


def test_a_killed_build_resumes_after_its_last_whole_chunk(tmp_path, monkeypatch):
    written = []
    write = hyperinf.index._write_chunk

    def dying(directory, index, batches, dtype):
        if index == 2:
            raise KeyboardInterrupt
        written.append(index)
        write(directory, index, batches, dtype)

    monkeypatch.setattr(hyperinf.index, "_write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, dim=12, chunk_batches=1)
    with pytest.raises(FitMismatchError, match="not complete"):
        GradientIndex.open(tmp_path / "index")
    monkeypatch.setattr(hyperinf.index, "_write_chunk", lambda *a: (written.append(a[1]), write(*a)))
    resumed = build(tmp_path, dim=12, chunk_batches=1)
    assert written == [0, 1, 2]  # the resumed build wrote only the missing chunk
    whole = build(tmp_path, "fresh", dim=12, chunk_batches=1)
    assert torch.equal(resumed.rows, whole.rows) and torch.equal(resumed.ids, torch.arange(N_TRAIN))


def test_a_folder_built_with_other_settings_is_refused(tmp_path):
    build(tmp_path, dim=12)
    with pytest.raises(CheckpointMismatchError, match=r"other settings \(dim, layouts differ\)"):
        build(tmp_path, dim=6)


def test_querying_with_other_weights_is_refused(tmp_path):
    index = build(tmp_path, dim=12)
    engine = pairwise_setup()[0]
    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    other = InfluenceEngine(model, loss_fn, blocks="linear", damping=DAMPING, dtype="float64", progress=False)
    with pytest.raises(
        FitMismatchError, match=r"weights of block '0' differ from those the index in .* build it again"
    ):
        index.pairwise(other, query_loader())


def test_a_fresh_engine_loads_the_index_fit_and_other_damping_is_refused(tmp_path):
    engine, _, _, loader = pairwise_setup()
    index = build(tmp_path, dim=0, method="exact", storage="float32")
    options = {"blocks": "linear", "method": "exact", "dtype": "float64", "progress": False}
    fresh = InfluenceEngine(engine.model, loss_fn, damping=DAMPING, **options)
    assert_agree(index.pairwise(fresh, query_loader()).double(), reference_pairwise("exact"), 1e-6)
    other = InfluenceEngine(engine.model, loss_fn, damping=DAMPING / 2, **options)
    with pytest.raises(FitMismatchError, match="'exact' preconditioner differs from the one the index in"):
        index.pairwise(other, query_loader())


@pytest.mark.parametrize("method", ["lissa", "datainf"])
def test_methods_without_a_square_root_cannot_build_an_index(tmp_path, method):
    with pytest.raises(ConfigurationError, match=f"method '{method}' cannot build a gradient index"):
        build(tmp_path, method=method)
    assert not (tmp_path / "index").exists()


def test_a_distributed_engine_is_refused_rather_than_indexing_one_shard(tmp_path, monkeypatch):
    engine = pairwise_setup()[0]
    runtime = dataclasses.replace(engine.config.runtime, distributed=True)
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, runtime=runtime))
    with pytest.raises(ConfigurationError, match="one index per torch.distributed shard is not supported"):
        GradientIndex.build(engine, pairwise_setup()[3], tmp_path / "index")
