"""Pass 2's arithmetic: query chunks of exactly the asked size, and top-k equal to sorting the full matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine
from hyperinf.gradients import BatchGradients
from hyperinf.scoring import query_chunks

N_TRAIN, N_QUERY = 37, 11


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(N_TRAIN + N_QUERY, 6, dtype=torch.float64), torch.randint(0, 3, (N_TRAIN + N_QUERY,))
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=8)
    queries = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=5)
    engine = InfluenceEngine(model, loss_fn, blocks="linear", method="exact", dtype="float64", progress=False).fit(
        train
    )
    return engine, train, queries


def batch_of(rows: torch.Tensor) -> BatchGradients:
    return BatchGradients(torch.zeros(len(rows)), {"a": rows[:, None, None].expand(-1, 2, 3), "b": rows[:, None, None]})


def test_query_chunks_regroup_rows_in_order():
    batches = [batch_of(torch.arange(0.0, 5.0)), batch_of(torch.arange(5.0, 7.0)), batch_of(torch.arange(7.0, 14.0))]
    chunks = list(query_chunks(batches, 3))
    assert [c["b"].shape[0] for c in chunks] == [3, 3, 3, 3, 2]
    torch.testing.assert_close(torch.cat([c["b"].flatten() for c in chunks]), torch.arange(0.0, 14.0))
    torch.testing.assert_close(torch.cat([c["a"][:, 1, 2] for c in chunks]), torch.arange(0.0, 14.0))


def test_pairwise_preconditions_at_most_query_chunk_rows_at_once(problem, monkeypatch):
    engine, train, queries = problem
    pre = engine.preconditioner("exact")
    sizes = []
    original = pre.apply
    monkeypatch.setattr(
        pre, "apply", lambda vectors: sizes.append(next(iter(vectors.values())).shape[0]) or original(vectors)
    )
    chunked = engine.pairwise(train, queries, query_chunk=3)  # query batches hold 5 rows
    assert sizes == [3, 3, 3, 2]
    torch.testing.assert_close(chunked, engine.pairwise(train, queries, query_chunk=256), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [1, 4, N_TRAIN + 5])
def test_top_k_equals_sorting_the_pairwise_matrix(problem, k):
    engine, train, queries = problem
    full = engine.pairwise(train, queries)  # [n_train, n_query], checked against its definition in test_methods
    top = engine.top_k(train, queries, k=k, query_chunk=4)
    kept = min(k, N_TRAIN)
    order = full.T.argsort(dim=1)
    assert top.helpful.shape == (N_QUERY, kept)
    torch.testing.assert_close(top.helpful, order[:, :kept])
    torch.testing.assert_close(top.harmful, order.flip(1)[:, :kept])
    torch.testing.assert_close(top.helpful_scores, full.T.gather(1, top.helpful))
    torch.testing.assert_close(top.harmful_scores, full.T.gather(1, top.harmful))
    assert (top.helpful_scores[:, 0] <= top.harmful_scores[:, 0]).all()


def test_top_k_refuses_k_below_one(problem):
    engine, train, queries = problem
    with pytest.raises(ValueError, match="k must be >= 1"):
        engine.top_k(train, queries, k=0)
