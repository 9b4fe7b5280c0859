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
    torch.testing.assert_close(curvature.gfim("dense"), gfim)


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
        InfluenceConfig(damping_mode="per-row")


def test_spectrum_reports_eigenvalues_damping_and_condition():
    blocks, grads = dense_block_gradients(r=256)
    curvature = CurvatureAccumulator(blocks, dtype=torch.float64)
    curvature.update({"dense": grads})
    gfim = torch.einsum("nrd,nre->de", grads, grads) / grads.shape[0]
    eigs = torch.linalg.eigvalsh(gfim)
    (row,) = curvature.spectrum(0.1, "gfim")
    lam = curvature.damping(blocks[0], 0.1, "gfim")
    assert (row["block"], row["r"], row["d"], row["damping"]) == ("dense", 256, 12, lam)
    assert row["eig_max"] == pytest.approx(float(eigs[-1])) and row["eig_mean"] == pytest.approx(float(eigs.mean()))
    assert row["condition"] == pytest.approx(float((eigs[-1] + lam) / (eigs[0] + lam)), rel=1e-6)


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
    assert gaps["shared"] == pytest.approx((1 - 1 / r) ** 0.5, rel=1e-6)
