"""Searching a gradient index with faiss (:mod:`hyperinf.index_faiss`) against the exact scores: test_pairwise's
looped gradients and Cholesky solves, through a whole index (test_index.py checks the index against them)."""

from __future__ import annotations

import sys

import pytest
import torch
from test_pairwise import N_QUERY, N_TRAIN, query_loader, reference_pairwise
from test_pairwise import setup as pairwise_setup

from hyperinf import ConfigurationError
from hyperinf.index import GradientIndex
from hyperinf.index_faiss import FaissSearch

K = 4


@pytest.fixture()
def whole(tmp_path):
    """A whole float32 index of test_pairwise's rows, and its queries preconditioned by ``exact``."""
    engine, _, _, loader = pairwise_setup()
    index = GradientIndex.build(engine, loader, tmp_path / "index", dim=0, storage="float32")
    return index, index.project_queries(engine, query_loader(), method="exact")


def assert_exact_top_k(top, reference: torch.Tensor) -> None:
    """``top`` holds, per query column of ``reference`` ``[n, m]``, its ``K`` lowest and highest scores."""
    low, high = reference.topk(K, dim=0, largest=False), reference.topk(K, dim=0, largest=True)
    assert torch.equal(top.helpful, low.indices.T) and torch.equal(top.harmful, high.indices.T)
    torch.testing.assert_close(top.helpful_scores.double(), low.values.T, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(top.harmful_scores.double(), high.values.T, rtol=1e-5, atol=0.0)


def test_a_flat_faiss_index_finds_the_exact_proponents_and_opponents(whole):
    index, queries = whole
    assert_exact_top_k(FaissSearch(index, "Flat").search(queries, k=K), reference_pairwise("exact"))


def test_an_ivf_index_probing_every_cluster_is_exact_and_is_saved_once(whole):
    index, queries = whole
    top = FaissSearch(index, "IVF2,Flat", parameters="nprobe=2").search(queries, k=K)
    assert_exact_top_k(top, reference_pairwise("exact"))
    (saved,) = index.directory.glob("faiss-*.index")
    stamp = saved.stat().st_mtime_ns
    again = FaissSearch(index, "IVF2,Flat", parameters="nprobe=2").search(queries, k=K)
    assert saved.stat().st_mtime_ns == stamp and torch.equal(again.helpful, top.helpful)
    FaissSearch(index, "IVF2,Flat", normalize=True)
    assert len(list(index.directory.glob("faiss-*.index"))) == 2  # one per factory and cosine option
    index.norms = index.norms * 2  # other rows under the same settings (e.g. a shard rebuilt): not the saved one
    FaissSearch(index, "IVF2,Flat")
    assert len(list(index.directory.glob("faiss-*.index"))) == 3


def test_the_cosine_option_ranks_by_minus_the_cosine(whole):
    index, queries = whole
    rows = index.rows.double() * index.norms.double()[:, None]
    cosine = (
        -(rows / rows.norm(dim=1, keepdim=True)) @ (queries.double() / queries.double().norm(dim=1, keepdim=True)).T
    )
    assert cosine.shape == (N_TRAIN, N_QUERY)
    assert_exact_top_k(FaissSearch(index, "Flat", normalize=True).search(queries, k=K), cosine)


def test_bad_factories_parameters_and_a_search_that_finds_too_few_rows_are_refused(whole):
    index, queries = whole
    with pytest.raises(ConfigurationError, match="'Nonsense' is not a faiss index factory string"):
        FaissSearch(index, "Nonsense")
    with pytest.raises(ConfigurationError, match="faiss parameters 'nprobe=2' do not apply to a 'Flat' index"):
        FaissSearch(index, "Flat", parameters="nprobe=2")
    with pytest.raises(ConfigurationError, match=f"faiss could not build a 'IVF64,Flat' index of {N_TRAIN} rows"):
        FaissSearch(index, "IVF64,Flat")
    narrow = FaissSearch(index, "IVF4,Flat", parameters="nprobe=1")
    with pytest.raises(ConfigurationError, match=f"found fewer than {N_TRAIN} rows for some queries"):
        narrow.search(queries, k=N_TRAIN)


def test_without_faiss_installed_the_error_names_the_extra(whole, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'hyperinf\[faiss\]'"):
        FaissSearch(whole[0])
