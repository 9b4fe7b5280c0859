"""``pairwise`` for every method: each column is that query's validation score, and equals a reference.

The references are built without the engine's numbers: per-example gradients from a loop of
single-example backward calls (:func:`models.reference_gradients`), the damping from its
definition, and an explicit solve of the damped GFIM, flattened FIM, explicit Kronecker products
(K-FAC, EK-FAC: :func:`models.reference_kronecker`) or autograd Hessian.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from models import reference_gradients, reference_kronecker, split_examples
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset, TensorDataset

from hyperinf import InfluenceEngine

N_TRAIN, N_QUERY, QUERY_BATCH = 24, 10, 5
# The untrained MLP's Hessian is indefinite (smallest eigenvalue -0.2): c = 10 (lambda_l = 0.5 and 0.8)
# makes every method's damped curvature, the Hessian's included, positive definite.
DAMPING = 10.0
METHODS = [
    "hyperinf",
    "hyperinf-fim",
    "exact",
    "exact-fim",
    "exact-hessian",
    "datainf",
    "lissa",
    "tracin",
    "kfac",
    "ekfac",
]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@functools.cache
def setup() -> tuple[InfluenceEngine, TensorDataset, TensorDataset, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(N_TRAIN + N_QUERY, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=gen)
    train, queries = TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    loader = DataLoader(train, batch_size=8)
    engine = InfluenceEngine(model, loss_fn, blocks="linear", damping=DAMPING, dtype="float64", progress=False)
    engine.fit(loader, methods=METHODS)
    return engine, train, queries, loader


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``{name: [n, r, d]}`` -> ``[n, sum_l r_l d_l]``, blocks in order."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def training_hessian(engine: InfluenceEngine, train: TensorDataset) -> torch.Tensor:
    """Autograd Hessian of the mean training loss in the blocks' ``[W | b]`` coordinates (side "in")."""
    blocks = engine.blocks
    assert all(b.side == "in" and b.has_bias for b in blocks)
    start = torch.cat([torch.cat([b.module.weight, b.module.bias[:, None]], 1).detach().reshape(-1) for b in blocks])
    sizes = [b.num_params for b in blocks]

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        params = {}
        for b, piece in zip(blocks, theta.split(sizes)):
            layout = piece.reshape(b.shape)
            params[f"{b.name}.weight"], params[f"{b.name}.bias"] = layout[:, :-1], layout[:, -1]
        return loss_fn(lambda x: functional_call(engine.model, params, (x,)), train.tensors).mean()

    return torch.autograd.functional.hessian(mean_loss, start)


@functools.cache
def reference_pairwise(method: str) -> torch.Tensor:
    """``-g_k^T A^{-1} q_j`` from looped gradients and an explicit solve or inverse, ``[N_TRAIN, N_QUERY]``."""
    engine, train, queries, _ = setup()
    g = reference_gradients(engine.model, loss_fn, split_examples(train.tensors), engine.blocks)
    q = reference_gradients(engine.model, loss_fn, split_examples(queries.tensors), engine.blocks)
    damping = {b.name: DAMPING * g[b.name].square().sum() / (N_TRAIN * b.num_params) for b in engine.blocks}
    if method == "tracin":
        return -flat(g) @ flat(q).T
    if method == "exact-hessian":
        diagonal = torch.cat([damping[b.name].expand(b.num_params) for b in engine.blocks])
        a = training_hessian(engine, train) + torch.diag(diagonal)
        return -flat(g) @ torch.linalg.solve(a, flat(q).T)
    kronecker = reference_kronecker(engine.model, loss_fn, split_examples(train.tensors), engine.blocks)
    out = torch.zeros(N_TRAIN, N_QUERY, dtype=torch.float64)
    for b in engine.blocks:
        gb, qb, lam = g[b.name], q[b.name], damping[b.name]
        if method == "exact":
            a = torch.einsum("nrd,nre->de", gb, gb) / N_TRAIN + lam * torch.eye(b.shape[1], dtype=gb.dtype)
            h = torch.linalg.solve(a, qb.transpose(1, 2)).transpose(1, 2)  # q_j A^{-1}, A symmetric
        elif method in ("exact-fim", "kfac", "ekfac"):  # a flattened rd x rd curvature: explicit, or Kronecker products
            vec = gb.reshape(N_TRAIN, -1)
            curvature = vec.T @ vec / N_TRAIN if method == "exact-fim" else kronecker[b.name][method]
            a = curvature + lam * torch.eye(b.num_params, dtype=gb.dtype)
            h = torch.linalg.solve(a, qb.reshape(N_QUERY, -1).T).T
        elif method == "datainf":  # DataInf's definition: the mean over i of (lam I + g_i g_i^T)^{-1} q_j
            vec, eye = gb.reshape(N_TRAIN, -1), torch.eye(b.num_params, dtype=gb.dtype)
            inverses = torch.stack([torch.linalg.inv(lam * eye + torch.outer(gi, gi)) for gi in vec])
            h = qb.reshape(N_QUERY, -1) @ inverses.mean(0)
        else:
            raise ValueError(method)
        out -= gb.reshape(N_TRAIN, -1) @ h.reshape(N_QUERY, -1).T
    return out


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Max entry error relative to the largest entry: pairwise matrices mix signs and magnitudes."""
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= rtol, error


def query_loader(batch_size: int = QUERY_BATCH) -> DataLoader:
    return DataLoader(setup()[2], batch_size=batch_size)


@pytest.mark.parametrize("method", METHODS)
def test_each_pairwise_column_is_the_score_of_that_query_alone(method):
    engine, _, queries, loader = setup()
    pair = engine.pairwise(loader, query_loader(), method=method)
    assert pair.shape == (N_TRAIN, N_QUERY)
    columns = torch.stack(
        [engine.score(loader, DataLoader(Subset(queries, [j])), method=method) for j in range(N_QUERY)], dim=1
    )
    assert_agree(pair, columns, 1e-13)  # measured <= 3e-16


# Max entry error allowed against the reference, relative to the largest entry; every method measured
# <= 6e-16. hyperinf / hyperinf-fim are held to the Schulz stopping tolerance (1.8e-12 in float64), the
# direct solves to 1e-13.
CLOSED = {
    "exact": 1e-13,
    "exact-fim": 1e-13,
    "exact-hessian": 1e-13,
    "datainf": 1e-13,
    "tracin": 1e-13,
    "kfac": 1e-13,
    "ekfac": 1e-13,
    "hyperinf": 1e-11,
    "hyperinf-fim": 1e-11,
}
REFERENCE_OF = {"hyperinf": "exact", "hyperinf-fim": "exact-fim"}


@pytest.mark.parametrize("method", list(CLOSED))
@pytest.mark.parametrize("query_chunk", [256, QUERY_BATCH, 3, 1])
def test_pairwise_equals_an_explicit_solve_whatever_the_query_chunk(method, query_chunk):
    engine, _, _, loader = setup()
    pair = engine.pairwise(loader, query_loader(), method=method, query_chunk=query_chunk)
    assert_agree(pair, reference_pairwise(REFERENCE_OF.get(method, method)), CLOSED[method])


def test_query_chunk_smaller_than_a_query_batch_bounds_the_queries_preconditioned_at_once():
    """Every chunk of queries costs one pass over the (uncached) training set: the pass count shows the chunk size."""
    _, train, queries, _ = setup()
    model = setup()[0].model
    calls: list[int] = []

    def counting_loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls.append(len(batch[1]))
        return loss_fn(m, batch)

    engine = InfluenceEngine(
        model,
        counting_loss,
        blocks="linear",
        method="exact",
        dtype="float64",
        progress=False,
        cache_bytes=0,
        spill=False,
    )
    loader = DataLoader(train, batch_size=8)
    engine.fit(loader)
    calls.clear()
    engine.pairwise(loader, query_loader(), query_chunk=3)
    passes = (sum(calls) - N_QUERY) / N_TRAIN
    assert passes == math.ceil(N_QUERY / 3), passes
