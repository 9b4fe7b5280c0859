"""Tests of hyperinf.linalg against exact references (spectral inverses, float64 solves)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from hyperinf.errors import NotConvergedError, NotConvergedWarning, NotSPDError
from hyperinf.linalg import (
    cholesky_inverse,
    cholesky_solve,
    hyperpower_inverse,
    neumann_series,
    schulz_inverse,
    spectral_bounds,
)
from hyperinf.paper.solvers import conjugate_gradient, gmres, sor

F64 = torch.float64


def spd(shape: tuple[int, ...], d: int, cond: float, scale: float = 1.0, seed: int = 0):
    """SPD ``Q diag(eigs) Q^T`` with eigenvalues log-spaced in ``scale * [1, cond]`` (float64),
    and its exact inverse ``Q diag(1/eigs) Q^T``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*shape, d, d, generator=g, dtype=F64))
    eigs = scale * torch.logspace(0, math.log10(cond), d, dtype=F64)
    A = (Q * eigs) @ Q.mT
    inverse = (Q / eigs) @ Q.mT
    return (A + A.mT) / 2, (inverse + inverse.mT) / 2


def relative_error(X: torch.Tensor, reference: torch.Tensor) -> float:
    norms = torch.linalg.matrix_norm(X.to(F64) - reference) / torch.linalg.matrix_norm(reference)
    return norms.max().item()


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- Schulz accuracy

ACCURACY_CASES = [
    pytest.param(dtype, d, cond, scale, id=f"{str(dtype)[6:]}-d{d}-cond{cond:.0e}-scale{scale:.0e}")
    for dtype, conds in [(torch.float64, (1e1, 1e3, 1e6)), (torch.float32, (1e1, 1e2, 1e4))]
    for d in (16, 128, 512)
    for cond in conds
    for scale in (1.0, 1e4)
]


@pytest.mark.filterwarnings("error::hyperinf.errors.NotConvergedWarning")
@pytest.mark.parametrize(("dtype", "d", "cond", "scale"), ACCURACY_CASES)
def test_schulz_as_accurate_as_cholesky_in_same_precision(dtype, d, cond, scale):
    A64, exact = spd((2,), d, cond, scale)
    A = A64.to(dtype)
    if dtype != F64:  # the float32 matrix is a rounded one: its exact inverse, in float64
        exact = torch.linalg.inv(A.to(F64))
    X, info = schulz_inverse(A)
    cholesky = torch.cholesky_inverse(torch.linalg.cholesky(A))
    assert info.converged and X.dtype == dtype and X.shape == A.shape
    assert relative_error(X, exact) <= 10 * relative_error(cholesky, exact)
    assert relative_error(X, X.mT) <= 10 * relative_error(cholesky, exact)


def test_schulz_as_accurate_as_cholesky_on_scores_of_a_damped_low_rank_gfim():
    """Influence-like products ``v X g^T`` on a damped low-rank Gram matrix (a LoRA block's GFIM).

    The gradients ``g`` lie along ``A``'s large eigen-directions, where the entries of ``A^{-1}``
    are small: a float32 iterate whose error is small relative to ``||A^{-1}||`` can still be
    far off there (averaging it with its transpose made it 1e-1), which the Frobenius error of
    ``X`` alone does not show.
    """
    gen = torch.Generator().manual_seed(0)
    d, n = 384, 16000
    basis = torch.randn(d, 3, generator=gen, dtype=F64)
    g = (
        torch.randn(n, 3, generator=gen, dtype=F64) @ basis.T * 3
        + 1.0
        + 0.01 * torch.randn(n, d, generator=gen, dtype=F64)
    )
    gram = g.T @ g / 2000
    A64 = gram + 0.1 * torch.trace(gram) / (8 * d) * torch.eye(d, dtype=F64)
    A = A64.float()
    v, grads = torch.randn(8, d, generator=gen, dtype=F64), g[:64]
    target = v @ torch.linalg.inv(A64) @ grads.T
    X, info = schulz_inverse(A)
    cholesky = torch.cholesky_inverse(torch.linalg.cholesky(A))

    def score_error(inverse: torch.Tensor) -> float:
        return relative_error((v.float() @ inverse @ grads.float().T).double(), target)

    assert info.converged
    assert score_error(X) <= 3 * score_error(cholesky)


def test_spectral_bounds_bracket_the_spectrum():
    A, _ = spd((4,), 32, 1e3, scale=7.0)
    eigs = torch.linalg.eigvalsh(A)
    lo, hi = spectral_bounds(A)
    assert lo.shape == hi.shape == (4,)
    assert (lo >= 0).all() and (lo <= eigs[:, 0]).all() and (hi >= eigs[:, -1]).all()
    lo, _ = spectral_bounds(A, lower_bound=0.5)
    assert torch.equal(lo, torch.full((4,), 0.5, dtype=F64))
    diagonal = torch.diag(torch.tensor([2.0, 3.0, 5.0], dtype=F64))
    lo, hi = spectral_bounds(diagonal)  # Gershgorin is exact here; hi only by the rounding margin
    assert lo.item() == 2.0 and 5.0 <= hi.item() <= 5.0 * (1 + 1e-12)


@pytest.mark.parametrize("A", [3.0 * torch.eye(8, dtype=F64), torch.diag(torch.arange(1.0, 9.0, dtype=F64))])
def test_auto_init_converges_when_the_bounds_are_tight(A):
    X, info = schulz_inverse(A)
    assert info.converged
    assert relative_error(X, torch.diag(1 / A.diagonal())) < 1e-14


def test_lower_bound_and_tensor_init():
    A, exact = spd((3,), 64, 1e3)
    _, plain = schulz_inverse(A)
    X, info = schulz_inverse(A, lower_bound=1.0)  # the true lambda_min
    assert info.converged and info.iterations < plain.iterations
    assert relative_error(X, exact) < 1e-12
    X0 = exact + 1e-4 * randn(64, 64) @ randn(64, 64, seed=2).mT / 64
    X, info = schulz_inverse(A, init=X0)
    assert info.converged and info.iterations < plain.iterations / 2
    assert relative_error(X, exact) < 1e-12


# ----------------------------------------------------------------------------- Schulz failure modes


def test_paper_fixed_init_diverges_above_lambda_max_4000_where_auto_converges():
    A, exact = spd((), 64, 5000.0)  # lambda_max = 5000 > 2 / 5e-4
    with pytest.warns(NotConvergedWarning, match=r"diverged.*init='auto'"):
        _, info = schulz_inverse(A, init=5e-4)
    assert not info.converged and info.stop_reason == "diverged"
    assert info.iterations < 20  # stopped early
    X, info = schulz_inverse(A)
    assert info.converged
    assert relative_error(X, exact) < 1e-12


def test_paper_fixed_init_converges_below_lambda_max_4000():
    A, exact = spd((), 32, 1000.0)
    X, info = schulz_inverse(A, init=5e-4)
    assert info.converged and relative_error(X, exact) < 1e-12


def test_order_3_gives_the_same_inverse_in_fewer_iterations():
    A, exact = spd((2,), 128, 1e4)
    X2, info2 = schulz_inverse(A)
    X3, info3 = hyperpower_inverse(A, order=3)
    assert info3.converged and info3.method == "hyperpower(order=3)"
    assert info3.iterations < info2.iterations
    assert relative_error(X3, exact) < 1e-11
    assert relative_error(X3, X2) < 1e-11


def test_not_converged_is_never_silent():
    A, exact = spd((2,), 32, 1e3)
    with pytest.warns(NotConvergedWarning, match=r"after 2 iterations.*raise max_iter"):
        _, info = schulz_inverse(A, max_iter=2)
    assert not info.converged and info.stop_reason == "max_iter" and info.iterations == 2
    with pytest.raises(NotConvergedError, match="schulz did not converge"):
        schulz_inverse(A, max_iter=2, on_fail="raise")
    with pytest.warns(NotConvergedWarning, match="Cholesky"):
        X, info = schulz_inverse(A, max_iter=2, on_fail="cholesky")
    assert info.converged and info.stop_reason == "fallback" and info.method.startswith("cholesky")
    assert relative_error(X, exact) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = schulz_inverse(A, max_iter=2, on_fail="ignore")
    assert not info.converged


def test_item_residuals_name_the_matrix_that_failed():
    good, _ = spd((), 32, 10.0)
    bad, _ = spd((), 32, 1e6, seed=1)  # float32 Schulz stalls far above tol here
    A = torch.stack([good, bad, good]).float()
    with pytest.warns(NotConvergedWarning, match=r"batch item\(s\) 1 \(residual \S+\) of 3 ") as caught:
        X, info = schulz_inverse(A)
    assert len(info.item_residuals) == 3 and info.residual == max(info.item_residuals)
    assert info.item_residuals[0] <= info.tol and info.item_residuals[2] <= info.tol
    assert info.item_residuals[1] > 100 * info.tol
    assert info.stop_reason == "stalled" and info.item_converged() == (True, False, True)
    assert f"1 (residual {info.item_residuals[1]:.3g})" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the caller, not into linalg
    for i in range(3):  # each entry bounds that matrix's own ||I - A X||_2, within d^(1/4)
        T = torch.eye(32, dtype=F64) - A[i].double() @ X[i].double()
        spectral = float(torch.linalg.matrix_norm(T, ord=2))
        assert spectral <= info.item_residuals[i] <= 32**0.25 * spectral * (1 + 1e-6)
    with pytest.warns(NotConvergedWarning, match="Cholesky"):
        _, fallback = schulz_inverse(A, max_iter=2, on_fail="cholesky")
    assert len(fallback.item_residuals) == 3 and max(fallback.item_residuals) == fallback.residual


def _one_small_eigenvalue(d: int, small: float) -> torch.Tensor:
    """``Q diag(small, 1, ..., 1) Q^T``: well conditioned but for one eigen-direction."""
    Q, _ = torch.linalg.qr(randn(d, d))
    eigs = torch.ones(d, dtype=F64)
    eigs[0] = small
    return (Q * eigs) @ Q.mT


def test_stalled_run_off_along_one_direction_is_not_converged():
    """Float32 stalls with ``X`` accurate but along the smallest eigen-direction: the RMS of the
    eigen-residuals passes the stall limit ``sqrt(tol)``, the spectral norm does not."""
    d = 256
    A = _one_small_eigenvalue(d, 3e-5).float()
    with pytest.warns(NotConvergedWarning, match=r"stalled.*> sqrt\(tol\)"):
        X, info = schulz_inverse(A)
    T = torch.eye(d, dtype=F64) - A.double() @ X.double()
    rms = float(torch.linalg.matrix_norm(T)) / math.sqrt(d)
    spectral = float(torch.linalg.matrix_norm(T, ord=2))
    limit = math.sqrt(info.tol)
    assert rms < limit / 2 and spectral > 2 * limit  # the case the RMS rule got wrong
    assert info.stop_reason == "stalled" and info.limit == limit
    assert not info.converged and info.item_converged() == (False,)
    assert spectral <= info.residual <= 1.01 * spectral  # one bad direction: the bound is tight


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("cond", [1e1, 1e3, 1e6])
def test_residual_bounds_the_exact_spectral_norm(dtype, cond):
    A = spd((3,), 96, cond, seed=2)[0].to(dtype)
    X, info = schulz_inverse(A, on_fail="ignore")
    T = torch.eye(96, dtype=F64) - A.double() @ X.double()
    spectral = torch.linalg.matrix_norm(T, ord=2).tolist()
    for exact, bound, ok in zip(spectral, info.item_residuals, info.item_converged()):
        assert exact <= bound <= 96**0.25 * exact
        assert ok == (bound <= info.limit)
        if ok:
            assert exact <= info.limit
    if dtype == F64 and cond <= 1e3:  # float64 reaches its tolerance on well-conditioned blocks
        assert info.stop_reason == "tol" and max(spectral) <= info.tol


def test_singular_matrix_is_reported_not_converged():
    Q, _ = torch.linalg.qr(randn(32, 32))
    eigs = torch.linspace(0.0, 10.0, 32, dtype=F64)  # one zero eigenvalue
    with pytest.warns(NotConvergedWarning, match=r"stalled.*add damping or use float64"):
        _, info = schulz_inverse((Q * eigs) @ Q.mT)
    assert not info.converged


def test_schulz_callback_once_per_iteration_and_residual_history():
    A, _ = spd((2, 3), 16, 100.0)
    seen: list[tuple[int, tuple[int, ...]]] = []
    _, info = schulz_inverse(A, callback=lambda t, X: seen.append((t, tuple(X.shape))))
    assert [t for t, _ in seen] == list(range(1, info.iterations + 1))
    assert all(shape == (2, 3, 16, 16) for _, shape in seen)
    assert len(info.residuals) == info.iterations + 1 and info.residuals[-1] == info.residual


@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_schulz_batched_shapes(shape):
    A, exact = spd(shape, 24, 100.0)
    X, info = schulz_inverse(A)
    assert X.shape == A.shape and info.converged
    assert relative_error(X, exact) < 1e-13


def test_schulz_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\[\.\.\., d, d\]"):
        schulz_inverse(torch.ones(3, 4))
    with pytest.raises(ValueError, match="order"):
        schulz_inverse(torch.eye(3), order=1)
    with pytest.raises(ValueError, match="on_fail"):
        schulz_inverse(torch.eye(3), on_fail="retry")
    with pytest.raises(ValueError, match="init"):
        schulz_inverse(torch.eye(3), init="paper")


# ----------------------------------------------------------------------------- Cholesky


def test_cholesky_inverse_and_solve_match_exact():
    A, exact = spd((2, 3), 20, 1e3)
    assert relative_error(cholesky_inverse(A), exact) < 1e-12
    B = randn(2, 3, 20, 4)
    expected = exact @ B
    assert torch.allclose(cholesky_solve(A, B), expected, rtol=0, atol=1e-10)
    assert torch.allclose(cholesky_solve(A, B[..., 0]), expected[..., 0], rtol=0, atol=1e-10)


def _bad_stacks():
    A, _ = spd((3,), 6, 10.0)
    indefinite, asymmetric, nan = A.clone(), A.clone(), A.clone()
    indefinite[1] -= 2.0 * torch.eye(6, dtype=F64)  # smallest eigenvalue 1 -> -1
    asymmetric[1, 0, 5] += 1.0
    nan[1, 2, 2] = math.nan
    return [(indefinite, "not positive definite"), (asymmetric, "not symmetric"), (nan, "NaN")]


@pytest.mark.parametrize(("A", "problem"), _bad_stacks())
def test_cholesky_raises_not_spd_naming_the_batch_item(A, problem):
    with pytest.raises(NotSPDError, match=rf"Batch item\(s\) \(1,\) .*{problem}.*damping"):
        cholesky_inverse(A)
    with pytest.raises(NotSPDError, match=r"\(1,\)"):
        cholesky_solve(A, randn(3, 6))
    with pytest.raises(NotSPDError, match=rf"The matrix .*{problem}"):
        cholesky_inverse(A[1])


# ----------------------------------------------------------------------------- solvers


def _diagonally_dominant(shape: tuple[int, ...], d: int) -> torch.Tensor:
    M = randn(*shape, d, d, seed=3)
    A = M @ M.mT / d
    return A + torch.diag_embed(A.abs().sum(-1))


SOLVERS = [
    pytest.param(conjugate_gradient, {}, id="cg"),
    pytest.param(gmres, {}, id="gmres"),
    pytest.param(gmres, {"restart": 8, "max_iter": 200}, id="gmres-restart"),
    pytest.param(neumann_series, {"max_iter": 2000}, id="neumann"),
    pytest.param(sor, {"omega": 1.0, "max_iter": 500}, id="sor-1.0"),
    pytest.param(sor, {"omega": 1.2, "max_iter": 500}, id="sor-1.2"),
]


@pytest.mark.parametrize(("solver", "kwargs"), SOLVERS)
@pytest.mark.parametrize("rhs", ["vector", "columns"])
def test_solvers_converge_to_the_exact_solution(solver, kwargs, rhs):
    A = _diagonally_dominant((2, 3), 24)
    b = randn(2, 3, 24, 5, seed=4) if rhs == "columns" else randn(2, 3, 24, seed=4)
    expected = torch.linalg.solve(A, b)
    steps: list[int] = []
    x, info = solver(A, b, tol=1e-10, callback=lambda t, _: steps.append(t), **kwargs)
    assert info.converged and info.residual <= 1e-10 and x.shape == b.shape
    assert torch.allclose(x, expected, rtol=0, atol=1e-8 * expected.abs().max())
    assert steps == list(range(1, info.iterations + 1))


def test_neumann_without_b_approximates_the_inverse():
    A = _diagonally_dominant((2,), 16)
    X, info = neumann_series(A, max_iter=2000, tol=1e-10)
    assert info.converged and X.shape == A.shape
    assert relative_error(X, torch.linalg.inv(A)) < 1e-9


def test_unscaled_neumann_diverges_and_reports_it():
    A, _ = spd((), 16, 10.0, scale=0.5)  # eigenvalues in [0.5, 5] > 2
    b = randn(16)
    steps: list[int] = []
    _, info = neumann_series(A, b, scale=1.0, max_iter=100, on_fail="ignore", callback=lambda t, _: steps.append(t))
    assert not info.converged and info.stop_reason == "diverged"
    assert steps == list(range(1, info.iterations + 1)) and info.iterations < 100
    with pytest.warns(NotConvergedWarning, match="scale=None"):
        neumann_series(A, b, scale=1.0)
    _, info = neumann_series(A, b, max_iter=3000, tol=1e-10)  # scaled by the spectral bound
    assert info.converged


@pytest.mark.parametrize("solver", [conjugate_gradient, gmres, neumann_series, sor])
def test_solvers_survive_non_finite_input(solver):
    A = _diagonally_dominant((), 8)
    A[0, 0] = math.inf
    x, info = solver(A, randn(8), max_iter=20, on_fail="ignore")
    assert not info.converged and x.shape == (8,)


def test_solver_failure_modes():
    A, _ = spd((), 32, 1e4)
    b = randn(32)
    with pytest.warns(NotConvergedWarning, match="cg did not converge") as caught:
        _, info = conjugate_gradient(A, b, max_iter=3)
    assert caught[0].filename == __file__
    assert not info.converged and info.iterations == 3
    with pytest.raises(NotConvergedError):
        sor(A, b, max_iter=3, on_fail="raise")
    with pytest.warns(NotConvergedWarning, match="Cholesky"):
        x, info = gmres(A, b, max_iter=3, on_fail="cholesky")
    assert info.converged and torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-10, atol=0)


def test_cg_starts_from_x0():
    A = _diagonally_dominant((), 16)
    b = randn(16)
    expected = torch.linalg.solve(A, b)
    x, info = conjugate_gradient(A, b, x0=expected, tol=1e-10)
    assert info.iterations == 0 and torch.equal(x, expected)
