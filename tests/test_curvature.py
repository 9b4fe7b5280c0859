"""Curvature accumulators and damping against sums written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperinf.blocks import select_blocks
from hyperinf.config import InfluenceConfig
from hyperinf.curvature import CurvatureAccumulator


def dense_block_gradients(n: int = 50, r: int = 64, d: int = 12, seed: int = 0):
    """A dense layer's blocks and per-sample gradients ``[n, r, d]`` with correlated rows (rank-one per example)."""
    g = torch.Generator().manual_seed(seed)
    blocks = select_blocks(nn.ModuleDict({"dense": nn.Linear(d, r, bias=False)}), "linear", include_bias=False)
    rows = torch.randn(n, r, 1, generator=g, dtype=torch.float64)
    inputs = torch.randn(n, 1, d, generator=g, dtype=torch.float64) * torch.logspace(0, 3, d, dtype=torch.float64)
    return blocks, rows * inputs


@pytest.mark.parametrize("mode", ["relative", "gfim", "absolute"])
def test_damping_modes_match_their_definitions(mode):
    blocks, grads = dense_block_gradients()
    curvature = CurvatureAccumulator(blocks, dtype=torch.float64)
    curvature.update({"dense": grads[:20]})
    curvature.update({"dense": grads[20:]})
    n, r, d = grads.shape
    squares = grads.square().sum()
    expected = {"relative": 0.1 * squares / (n * r * d), "gfim": 0.1 * squares / (n * d), "absolute": 0.1}[mode]
    assert curvature.damping(blocks[0], 0.1, mode) == pytest.approx(float(expected), rel=1e-12)
    gfim = torch.einsum("nrd,nre->de", grads, grads) / n
    # float64, entries up to 5e7: measured 1.2e-12 relative per entry, 8e-16 of the largest
    torch.testing.assert_close(curvature.gfim("dense"), gfim, rtol=1e-10, atol=1e-13 * float(gfim.abs().max()))


def test_gfim_damping_bounds_the_condition_number_whatever_r():
    blocks, grads = dense_block_gradients(r=256)
    curvature = CurvatureAccumulator(blocks, dtype=torch.float64)
    curvature.update({"dense": grads})
    d, c = grads.shape[2], 0.1
    for mode, bound in (("relative", None), ("gfim", 1 + d / c)):
        lam = curvature.damping(blocks[0], c, mode)
        eigs = torch.linalg.eigvalsh(curvature.gfim("dense") + lam * torch.eye(d, dtype=torch.float64))
        cond = float(eigs[-1] / eigs[0])
        if bound is None:
            assert cond > 1e4  # the paper's damping leaves a dense block this ill-conditioned
        else:
            assert cond <= bound


def test_unknown_damping_mode_is_named():
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        InfluenceConfig.from_options(damping_mode="per-row")


def test_spectrum_reports_eigenvalues_damping_and_condition():
    blocks, grads = dense_block_gradients(r=256)
    curvature = CurvatureAccumulator(blocks, dtype=torch.float64)
    curvature.update({"dense": grads})
    gfim = torch.einsum("nrd,nre->de", grads, grads) / grads.shape[0]
    eigs = torch.linalg.eigvalsh(gfim)
    (row,) = curvature.spectrum(0.1, "gfim")
    lam = curvature.damping(blocks[0], 0.1, "gfim")
    assert (row["block"], row["r"], row["d"], row["damping"]) == ("dense", 256, 12, lam)
    # the same float64 eigendecomposition: measured 9e-16 relative
    assert row["eig_max"] == pytest.approx(float(eigs[-1]), rel=1e-13)
    assert row["eig_mean"] == pytest.approx(float(eigs.mean()), rel=1e-13)
    assert row["condition"] == pytest.approx(float((eigs[-1] + lam) / (eigs[0] + lam)), rel=1e-13)


def test_kron_gap_is_zero_when_lemma_3_1_holds_and_large_when_rows_are_correlated():
    g = torch.Generator().manual_seed(0)
    n, r, d = 4000, 3, 5
    blocks = select_blocks(nn.ModuleDict({"dense": nn.Linear(d, r, bias=False)}), "linear", include_bias=False)
    independent = torch.randn(n, r, d, generator=g, dtype=torch.float64) * torch.arange(1.0, d + 1, dtype=torch.float64)
    shared = torch.randn(n, 1, d, generator=g, dtype=torch.float64).expand(n, r, d)  # every row the same
    gaps = {}
    for name, grads in (("independent", independent), ("shared", shared)):
        curvature = CurvatureAccumulator(blocks, fim=True, dtype=torch.float64)
        curvature.update({"dense": grads})
        gaps[name] = curvature.spectrum(0.1)[0]["kron_gap"]
    assert gaps["independent"] < 0.05  # sampling noise only
    # identical rows: F = 1 1^T (x) C, of which the block diagonal I (x) C holds 1/sqrt(r) of the norm
    assert gaps["shared"] == pytest.approx((1 - 1 / r) ** 0.5, rel=1e-13)  # measured exact in float64


def two_block_gradients(n: int, seed: int) -> tuple[list, dict[str, torch.Tensor]]:
    """Two blocks of different shapes and random per-sample gradients ``{name: [n, r, d]}``."""
    g = torch.Generator().manual_seed(seed)
    blocks = select_blocks(nn.ModuleDict({"a": nn.Linear(5, 3), "b": nn.Linear(3, 4, bias=False)}), "linear")
    return blocks, {b.name: torch.randn(n, *b.shape, generator=g, dtype=torch.float64) for b in blocks}


def test_merged_shards_equal_one_accumulator_over_their_union():
    blocks, grads = two_block_gradients(23, seed=0)
    shards = [(0, 4), (4, 10), (10, 23)]  # the first accumulator sees two batches, the second one
    first = CurvatureAccumulator(blocks, fim=True, dtype=torch.float64)
    second = CurvatureAccumulator(blocks, fim=True, dtype=torch.float64)
    for acc, (lo, hi) in ((first, shards[0]), (first, shards[1]), (second, shards[2])):
        acc.update({name: g[lo:hi] for name, g in grads.items()})
    union = CurvatureAccumulator(blocks, fim=True, dtype=torch.float64)
    union.update(grads)
    first.merge(second)
    assert first.count == union.count == 23
    for b in blocks:
        g = grads[b.name]
        flat = g.reshape(len(g), -1)
        by_hand = {"gram": torch.einsum("nrd,nre->de", g, g), "sq_norm": g.square().sum(), "fim": flat.T @ flat}
        for field, expected in by_hand.items():
            for acc in (first, union):
                actual = getattr(acc, field)[b.name]
                # float64 sums of ~23 terms in another order: measured <= 4e-16 of the largest entry
                assert float((actual - expected).abs().max()) <= 1e-13 * float(expected.abs().max()), (field, b.name)


def test_merging_accumulators_over_other_blocks_or_without_the_fim_raises():
    blocks, grads = two_block_gradients(6, seed=1)
    with_fim = CurvatureAccumulator(blocks, fim=True, dtype=torch.float64)
    with_fim.update(grads)
    before = [t.clone() for t in with_fim.tensors()]
    with pytest.raises(ValueError, match="different blocks"):
        with_fim.merge(CurvatureAccumulator(blocks[:1], fim=True, dtype=torch.float64))
    with pytest.raises(ValueError, match="flattened FIM"):
        with_fim.merge(CurvatureAccumulator(blocks, fim=False, dtype=torch.float64))
    with pytest.raises(ValueError, match="flattened FIM"):
        CurvatureAccumulator(blocks, fim=False, dtype=torch.float64).merge(with_fim)
    # a refused merge leaves the sums as they were
    assert with_fim.count == 6 and all(torch.equal(a, b) for a, b in zip(with_fim.tensors(), before))
