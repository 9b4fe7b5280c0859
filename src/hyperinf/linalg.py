"""Inverses and solves of symmetric positive-definite (SPD) curvature blocks: Schulz, Cholesky, Neumann.

The three the influence methods use; the shared helpers at the end (residuals, stop reasons,
``on_fail`` handling, the stationary iteration) are public so other solvers keep the same contract.

Every function takes ``A`` of shape ``[..., d, d]`` and works on the whole stack at once, so all
blocks of one size are handled by batched matrix multiplies. Iterative methods return
``(result, InverseInfo)``; none of them fails silently: by default a run that stops above its
tolerance emits :class:`~hyperinf.errors.NotConvergedWarning` (``on_fail`` picks raise, fall back
to Cholesky, or ignore), and a diverging run stops early and reports ``converged=False``.

Residuals. An inverse ``X`` is judged on an upper bound of the spectral norm ``||I - A X||_2``,
which bounds the relative error ``||X - A^{-1}||_2 / ||A^{-1}||_2`` (an RMS over eigen-directions
would not: it can be ``sqrt(d)`` times smaller and pass a block that is wrong along one
direction). Two bounds are used, both ``>= ||T||_2`` for ``T = I - A X``:

- inside the iterations (Schulz's stopping checks, Neumann and SOR inverses): ``||T||_F``, in the
  working precision: O(d^2) next to the O(d^3) step, exact for a rank-one ``T``, but up to
  ``sqrt(d)`` times ``||T||_2`` when rounding spreads the residual over every direction;
- on the matrix returned by a Schulz run that reached ``tol`` or stalled, and on the Cholesky
  fallback: ``||T^T T||_F^{1/2} = (sum_i sigma_i(T)^4)^{1/4}`` with ``T`` formed in float64, at
  most ``d^{1/4}`` times ``||T||_2`` for one more matmul. Measured on float32 inverses (the exact inverse rounded to
  float32, d = 1024, condition number 100): ``||T||_2 = 8.9e-7``, this bound ``2.2e-6``,
  ``||T||_F = 8.1e-6`` (above the float32 default tolerance ``6.4e-6``), and
  ``sqrt(||T||_1 ||T||_inf) = 7.4e-6``, no tighter than Frobenius on such residuals, so unused.

A solve ``A x = b`` is measured by ``||b - A x|| / ||b||`` per right-hand side. Each is reported
per matrix of the batch (``InverseInfo.item_residuals``) and as the worst over the batch.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from hyperinf.errors import NotConvergedError, NotConvergedWarning, NotSPDError

Callback = Callable[[int, Tensor], None]
OnFail = Literal["warn", "raise", "cholesky", "ignore"]
"""What a run that misses its tolerance does: warn, raise NotConvergedError, fall back to the
Cholesky result (with a warning), or nothing (the caller reads ``InverseInfo.converged``)."""
Init = Literal["auto"] | float | Tensor

_ON_FAIL: tuple[str, ...] = get_args(OnFail)
_ADVICE = {
    "stalled": "The residual stopped decreasing at the rounding floor: A is too ill-conditioned "
    "for its precision, or not SPD; add damping or use float64. ",
    "max_iter": "It was still improving: raise max_iter. ",
}
# A residual this large (starts are at most sqrt(d) for an inverse, 1 for a solve) only comes
# from an iteration that diverges.
_DIVERGED = 1e6
# Schulz: this many checks in a row without a new best residual means the precision floor.
_PATIENCE = 2
# Warnings point at the first frame outside this folder: the user's call, not the library's inner ones.
_PACKAGE = Path(__file__).parent


@dataclass(frozen=True)
class InverseInfo:
    """How an iterative inverse or solve ended.

    ``residual`` is the worst over the batch, measured on the returned result, of an upper bound
    of ``||I - A X||_2`` for inverses (see the module docstring: ``||T^T T||_F^{1/2}`` in float64
    for a Schulz run that reached ``tol`` or stalled and for the Cholesky fallback, otherwise
    ``||T||_F`` in the working precision), or of ``||b - A x|| / ||b||`` for solves;
    ``item_residuals`` holds it per matrix of the batch (the worst column of a solve). ``limit``
    is the largest residual counted as converged: ``tol`` (also when given None), or
    ``sqrt(tol)`` when a Schulz run stalled at its rounding floor. ``stop_reason`` is one of
    ``"tol"``, ``"stalled"`` (no progress: the precision floor), ``"diverged"``, ``"max_iter"``,
    or ``"fallback"`` (result replaced by the Cholesky one). ``residuals`` holds the residual
    checked before each update (Schulz: ``||T||_F``, then the returned matrix's; CG and GMRES:
    their cheap recursive estimate).
    """

    iterations: int
    residual: float
    converged: bool
    method: str
    tol: float
    stop_reason: str
    residuals: tuple[float, ...] = ()
    item_residuals: tuple[float, ...] = ()
    limit: float | None = None

    def __post_init__(self) -> None:
        if self.limit is None:  # frozen: set the default through object
            object.__setattr__(self, "limit", self.tol)

    def item_converged(self) -> tuple[bool, ...]:
        """Per matrix of the batch: its residual is within ``limit`` (all True after a fallback)."""
        limit = self.tol if self.limit is None else self.limit
        return tuple(self.converged or r <= limit for r in self.item_residuals)


def default_tol(dtype: torch.dtype) -> float:
    """Default stopping tolerance, ``eps ** 0.75``: ~6.4e-6 for float32, ~1.8e-12 for float64.

    Close to what each precision can reach on well-conditioned blocks; ill-conditioned ones stop
    on the stall rule of :func:`hyperpower_inverse` and are accepted up to ``sqrt(tol)``.
    Measured with the spectral-norm bound (eigenvalues log-spaced over the condition number,
    d = 16 .. 1024): float32 reaches ``tol`` up to condition 1e2 (bound <= 2.2e-6) and is accepted
    stalled at 1e3 .. 1e4 (bound <= 1.5e-4, exact ``||I - A X||_2 <= 6.9e-5``), not at 1e5 (exact
    1.2e-2 .. 2.0e-2: a few percent off along the smallest eigen-directions); float64 reaches
    ``tol`` up to condition 1e3 (bound <= 8.7e-13) and is accepted stalled at 1e6 .. 1e9.
    """
    return torch.finfo(dtype).eps ** 0.75


# ----------------------------------------------------------------------------- spectral bounds


def spectral_bounds(A: Tensor, lower_bound: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """Cheap bounds ``(lo, hi)`` with ``lo <= lambda_min <= lambda_max <= hi`` per symmetric ``A``.

    ``hi`` is the smaller of the largest absolute row sum and the Frobenius norm (each bounds the
    spectral radius), widened by ``d * eps`` so rounding in the sums cannot push it below
    ``lambda_max``. ``lo`` is the largest of ``lower_bound`` (e.g. the damping), the Gershgorin
    lower bound and 0. Shapes: ``A [..., d, d]`` -> ``lo, hi [...]``.
    """
    d = check_square(A)
    abs_rows = A.abs().sum(-1)
    hi = torch.minimum(abs_rows.amax(-1), torch.linalg.matrix_norm(A))
    hi = hi * (1 + d * torch.finfo(A.dtype).eps)
    diag = A.diagonal(dim1=-2, dim2=-1)
    gershgorin = (diag + diag.abs() - abs_rows).amin(-1)
    lo = torch.maximum(gershgorin, torch.as_tensor(lower_bound, dtype=A.dtype, device=A.device))
    return lo.clamp_min(0), hi


# ----------------------------------------------------------------------------- Schulz / hyperpower


def hyperpower_inverse(
    A: Tensor,
    *,
    order: int = 2,
    max_iter: int = 100,
    tol: float | None = None,
    init: Init = "auto",
    lower_bound: float | Tensor | None = None,
    on_fail: OnFail = "warn",
    callback: Callback | None = None,
) -> tuple[Tensor, InverseInfo]:
    """Inverse of SPD ``A [..., d, d]`` by the hyperpower iteration of order ``p >= 2``.

    ``T = I - A X``, ``X <- X (I + T + ... + T^{p-1})`` (Horner form, p matmuls per step), which
    gives ``I - A X_new = T^p``. ``init="auto"`` starts from ``X0 = alpha I`` with
    ``alpha = 2 / (hi + lo)`` from :func:`spectral_bounds` (``1 / hi`` when ``lo`` is 0), so
    ``||I - A X0||_2 < 1`` and the iteration converges for every SPD ``A``; ``lower_bound``
    (e.g. the damping) tightens ``lo``. A float ``c`` gives the paper's ``X0 = c I`` (it used
    5e-4, which diverges once ``lambda_max(A) > 2 / c``); a tensor is used as ``X0``.

    Stopping, checked every step on the worst ``||T||_F`` of the current iterate (computed from
    the ``A X`` the step needs anyway): once it is ``<= tol`` one more step is taken, which takes
    it to the precision floor, and the loop stops. It also stops when progress stalls at the
    rounding floor above ``tol`` (see :func:`_schulz_stop`), when the residual exceeds ``1e6`` or
    is not finite (diverged), or after ``max_iter`` steps. ``callback(t, X_t)`` is called after
    each step. A run that reached ``tol`` or stalled is symmetrized and given one last step (see
    :func:`_symmetric_step`), counted in ``info.iterations``; its ``info.residual`` is the float64
    bound ``||T^T T||_F^{1/2} >= ||I - A X||_2`` of the returned matrix. It has converged when
    that is ``<= tol``, or, for a run that stalled, ``<= sqrt(tol)`` (``info.limit``): as good as
    its precision allows, e.g. float32 with condition numbers up to ~1e4.
    """
    d = check_square(A)
    check_options(on_fail, max_iter)
    if order < 2:
        raise ValueError(f"order must be >= 2 (2 is Schulz); got {order}")
    tol = default_tol(A.dtype) if tol is None else tol
    X = _initial_inverse(A, init, lower_bound).reshape(-1, d, d)
    A3 = A.reshape(-1, d, d)
    X, reason, history, items = _hyperpower_loop(A3, X, order, max_iter, tol, callback, A.shape)
    if reason in ("tol", "stalled"):
        X = _symmetric_step(A3, X, order)
        items = _inverse_residuals(A3, X)
        history.append(worst(items))
        if callback is not None:
            callback(len(history) - 1, X.reshape(A.shape))
        reason = "tol" if history[-1] <= tol else "stalled"
    limit = math.sqrt(tol) if reason == "stalled" else tol
    residual = history[-1]
    method = "schulz" if order == 2 else f"hyperpower(order={order})"
    info = InverseInfo(
        len(history) - 1, residual, residual <= limit, method, tol, reason, tuple(history), per_item(items), limit
    )
    hint = (
        "add damping or use float64, or raise max_iter"
        if isinstance(init, str)
        else "use init='auto' (a fixed init c*I diverges when c*lambda_max(A) > 2)"
    )
    return finish(X.reshape(A.shape), info, on_fail, lambda: _exact_inverse(A), hint)


def schulz_inverse(A: Tensor, *, order: int = 2, **options: Any) -> tuple[Tensor, InverseInfo]:
    """Schulz's iteration ``X <- X (2I - A X)``: :func:`hyperpower_inverse` of order 2.

    ``options`` are those of :func:`hyperpower_inverse`. ``order`` is accepted so that callers
    taking the order from a setting (``InfluenceConfig.schulz_order``) can keep one call.
    """
    return hyperpower_inverse(A, order=order, **options)


def _initial_inverse(A: Tensor, init: Init, lower_bound: float | Tensor | None) -> Tensor:
    """``X0`` for the hyperpower iteration: ``alpha I`` (auto or fixed alpha) or a given tensor."""
    if isinstance(init, Tensor):
        return init.to(A).expand(A.shape).clone()
    if init == "auto":
        lo, hi = spectral_bounds(A, 0.0 if lower_bound is None else lower_bound)
        alpha = torch.where(lo > 0, 2 / (hi + lo), 1 / hi)
    elif isinstance(init, (int, float)) and not isinstance(init, bool):
        alpha = torch.full(A.shape[:-2], float(init), dtype=A.dtype, device=A.device)
    else:
        raise ValueError(f"init must be 'auto', a float or a tensor; got {init!r}")
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return alpha[..., None, None] * eye


def _hyperpower_loop(
    A: Tensor,
    X: Tensor,
    order: int,
    max_iter: int,
    tol: float,
    callback: Callback | None,
    shape: torch.Size,
) -> tuple[Tensor, str, list[float], Tensor]:
    """Iterate on ``A, X [N, d, d]``; return the last iterate, why it stopped, the history of the
    worst residual ``||I - A X||_F``, and the last iterate's residual per matrix.

    The loop carries ``N = -X``: then ``T = I - A X = A N + I`` is a diagonal shift of the
    product, and ``-(X S) = N S``, so a step is matmuls plus O(d) work, with no full-size
    elementwise pass.
    """
    history: list[float] = []
    N = X.neg_()
    for t in range(max_iter + 1):
        T = _add_identity(A @ N)
        items = torch.linalg.matrix_norm(T)
        history.append(worst(items))
        reason = _schulz_stop(history, tol, order, A.shape[-1], at_cap=t == max_iter)
        if reason is not None:
            return N.neg_(), reason, history, items
        N = _hyperpower_step(N, T, order)
        if callback is not None:
            callback(t + 1, N.neg().reshape(shape))
    raise AssertionError("unreachable: the loop stops at max_iter")


def _symmetric_step(A: Tensor, X: Tensor, order: int) -> Tensor:
    """Average ``X`` with its transpose, then take one more step with ``T = I - A X`` in float64.

    The inverse of an SPD matrix is symmetric, but averaging a converged float32 iterate with
    its transpose, and float32 rounding itself, leave errors that are small next to
    ``||A^{-1}||`` yet large along ``A``'s large eigen-directions, where the entries of
    ``A^{-1}`` are small and where gradients mostly lie. One step with the residual formed in
    float64 (mixed-precision refinement: two float64 matmuls) removes them.
    """
    X = ((X + X.mT) / 2).double()
    T = _add_identity(torch.bmm(A.double(), X).neg_())
    return _hyperpower_step(X, T, order).to(A.dtype)


def _schulz_stop(history: list[float], tol: float, order: int, d: int, at_cap: bool) -> str | None:
    """Why to stop after the residual ``r = ||T||_F`` (``history[-1]``) was measured, or None to step.

    Since ``I - A X_new = T^p``, exact arithmetic guarantees ``r_new <= r^p``; where that bound
    is below ``r / 4`` but the measured ``r_new`` exceeds ``r / 2``, rounding dominates: the
    iteration is at its precision floor ("stalled"). Further from convergence, a stall is
    ``_PATIENCE`` checks in a row without a new best residual; if the residual is then
    ``>= sqrt(d) = ||I - A 0||_F`` (no better than ``X = 0``), some eigen-direction has
    ``|1 - lambda x| > 1`` and grows: "diverged".
    """
    r = history[-1]
    if not math.isfinite(r) or r > _DIVERGED:
        return "diverged"
    if len(history) > 1:
        previous = history[-2]
        if previous <= tol:  # the step after reaching tol was taken: done
            return "tol" if r <= tol else "stalled"
        if previous ** (order - 1) <= 1 / 4 and r > previous / 2:
            return "stalled"
    if len(history) > _PATIENCE and min(history[-_PATIENCE:]) >= min(history[:-_PATIENCE]):
        return "diverged" if r >= math.sqrt(d) else "stalled"
    if at_cap:
        return "tol" if r <= tol else "max_iter"
    return None


def _hyperpower_step(X: Tensor, T: Tensor, order: int) -> Tensor:
    """``X S`` with ``S = I + T (I + T (I + ...)) = I + T + ... + T^{order-1}`` (Horner).

    Plain ``bmm`` plus in-place diagonal shifts (no identity is allocated). Order 2 builds
    ``S = I + T`` in ``T``'s storage.
    """
    S = T if order == 2 else T.clone()
    _add_identity(S)
    for _ in range(order - 2):
        S = _add_identity(torch.bmm(T, S))
    return torch.bmm(X, S)


def _add_identity(P: Tensor, scale: float = 1.0) -> Tensor:
    """``P + scale I`` in place (only the diagonal is touched)."""
    P.diagonal(dim1=-2, dim2=-1).add_(scale)
    return P


# ----------------------------------------------------------------------------- Cholesky (exact)


def cholesky_inverse(A: Tensor) -> Tensor:
    """Exact inverse of SPD ``A [..., d, d]`` via Cholesky; raises NotSPDError naming bad items."""
    return torch.cholesky_inverse(_cholesky(A))


def cholesky_solve(A: Tensor, B: Tensor) -> Tensor:
    """Exact ``A^{-1} B`` for SPD ``A [..., d, d]``, ``B [..., d]`` or ``[..., d, k]``."""
    L = _cholesky(A)
    columns, unflatten = as_columns(A, B)
    return unflatten(torch.cholesky_solve(columns, L.reshape(-1, *L.shape[-2:])))


def _cholesky(A: Tensor) -> Tensor:
    """Lower Cholesky factor, after checking that every item is finite, symmetric and PD."""
    check_square(A)
    _require(torch.isfinite(A).all(-1).all(-1), A, "contain NaN or Inf")
    scale = torch.linalg.matrix_norm(A).clamp_min(torch.finfo(A.dtype).tiny)
    asymmetry = torch.linalg.matrix_norm(A - A.mT) / scale
    # Far above rounding in accumulated curvature sums, far below a genuinely unsymmetric input.
    tolerance = max(100 * torch.finfo(A.dtype).eps, 1e-10)
    problem = f"are not symmetric (||A - A^T||_F / ||A||_F > {tolerance:.0e})"
    _require(asymmetry <= tolerance, A, problem)
    L, info = torch.linalg.cholesky_ex(A)
    _require(info == 0, A, "are not positive definite")
    return L


def _require(ok: Tensor, A: Tensor, problem: str) -> None:
    """Raise NotSPDError naming the batch items where ``ok`` is False."""
    if bool(ok.all()):
        return
    if A.dim() == 2:
        where = "The matrix"
    else:
        listed = _listing([str(tuple(i.tolist())) for i in torch.nonzero(~ok)])
        where = f"Batch item(s) {listed} of the {tuple(A.shape)} stack"
    raise NotSPDError(
        f"{where} {problem}, so no Cholesky factorization exists. Curvature blocks must be "
        "symmetric positive definite: add damping (A + lambda * I with lambda > 0), symmetrize "
        "with (A + A^T) / 2, and check the gradients for NaN/Inf."
    )


def _exact_inverse(A: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky inverse and its residual per matrix, for the ``on_fail='cholesky'`` fallback."""
    X = cholesky_inverse(A)
    d = A.shape[-1]
    return X, _inverse_residuals(A.reshape(-1, d, d), X.reshape(-1, d, d))


def _inverse_residuals(A: Tensor, X: Tensor) -> Tensor:
    """Per matrix of ``A, X [N, d, d]``, ``||T^T T||_F^{1/2} >= ||T||_2`` for ``T = I - A X`` in float64.

    ``(sum_i sigma_i^4)^{1/4}``: at most ``d^{1/4} ||T||_2``, where ``||T||_F`` can be
    ``sqrt(d) ||T||_2`` (see the module docstring); one float64 matmul more than ``||T||_F``.
    """
    T = _add_identity(torch.bmm(A.double(), X.double()).neg_())
    return torch.linalg.matrix_norm(torch.bmm(T.mT, T)).sqrt()


def exact_solve(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky solve and its relative residual per column, for the ``on_fail='cholesky'`` fallback."""
    X = cholesky_solve(A, B)
    columns, _ = as_columns(A, B)
    solution, _ = as_columns(A, X)
    R = torch.baddbmm(columns, A.reshape(-1, *A.shape[-2:]), solution, alpha=-1)
    return X, relative_residuals(R, columns)


# ----------------------------------------------------------------------------- stationary methods


def neumann_series(
    A: Tensor,
    b: Tensor | None = None,
    *,
    max_iter: int = 100,
    scale: float | Tensor | None = None,
    tol: float | None = None,
    on_fail: OnFail = "warn",
    callback: Callback | None = None,
) -> tuple[Tensor, InverseInfo]:
    """Truncated Neumann series for ``A^{-1} b`` (LiSSA's recursion); ``A^{-1}`` if b is None.

    ``x_t = (1/s) sum_{k<t} (I - A/s)^k b``, run as ``x_{t+1} = x_t + (b - A x_t) / s`` from
    ``x_0 = 0``, so ``t`` iterations sum ``t`` terms (LiSSA's ``r_0 = v`` start: ``t + 1``
    terms). It converges iff ``0 < lambda(A) < 2 s``: ``scale=None`` uses the
    :func:`spectral_bounds` upper bound, which guarantees it for SPD ``A``; ``scale=1`` is the
    paper's unscaled variant, which diverges once ``lambda_max(A) >= 2``.
    """
    d = check_square(A)
    if scale is None:
        scale = spectral_bounds(A)[1]
    s = torch.as_tensor(scale, dtype=A.dtype, device=A.device)
    s = s.expand(A.shape[:-2]).reshape(-1, 1, 1)
    hint = "use scale=None (a bound on lambda_max) so the series converges, or raise max_iter"
    return stationary(A, b, lambda R: R / s, max_iter, tol, on_fail, callback, "neumann", hint, d)


def stationary(
    A: Tensor,
    b: Tensor | None,
    correct: Callable[[Tensor], Tensor],
    max_iter: int,
    tol: float | None,
    on_fail: OnFail,
    callback: Callback | None,
    method: str,
    hint: str,
    d: int,
) -> tuple[Tensor, InverseInfo]:
    """``x_{t+1} = x_t + correct(b - A x_t)`` from 0; ``b=None`` solves for the inverse (b = I)."""
    check_options(on_fail, max_iter)
    tol = default_tol(A.dtype) if tol is None else tol
    A3 = A.reshape(-1, d, d)
    target = torch.eye(d, dtype=A.dtype, device=A.device).expand(A.shape) if b is None else b
    B, unflatten = as_columns(A, target)
    if b is None:
        measure = torch.linalg.matrix_norm  # ||I - A X||_F >= ||I - A X||_2
    else:
        measure = lambda R: relative_residuals(R, B)  # noqa: E731
    X = torch.zeros_like(B)
    history: list[float] = []
    for t in range(max_iter + 1):
        R = torch.baddbmm(B, A3, X, alpha=-1)
        items = measure(R)
        history.append(worst(items))
        reason = solver_stop(history[-1], tol, at_cap=t == max_iter)
        if reason is not None:
            break
        X = X + correct(R)
        if callback is not None:
            callback(t + 1, unflatten(X))
    assert reason is not None  # the step at max_iter always stops
    converged = reason == "tol"
    iterations = len(history) - 1
    info = InverseInfo(iterations, history[-1], converged, method, tol, reason, tuple(history), per_item(items))
    exact = (lambda: _exact_inverse(A)) if b is None else (lambda: exact_solve(A, b))
    return finish(unflatten(X), info, on_fail, exact, hint)


# ----------------------------------------------------------------------------- shared helpers


def solver_stop(r: float, tol: float, at_cap: bool) -> str | None:
    """Stop reason for solvers, or None to continue."""
    if not math.isfinite(r) or r > _DIVERGED:
        return "diverged"
    if r <= tol:
        return "tol"
    return "max_iter" if at_cap else None


def finish(
    result: Tensor,
    info: InverseInfo,
    on_fail: OnFail,
    exact: Callable[[], tuple[Tensor, Tensor]],
    hint: str,
) -> tuple[Tensor, InverseInfo]:
    """Apply ``on_fail`` to a run that did not converge; a warning points at the caller of linalg."""
    if info.converged or on_fail == "ignore":
        return result, info
    limit = f"tol {info.tol:.3g}"
    if info.limit != info.tol:
        limit = f"sqrt(tol) = {info.limit:.3g}, the limit at the rounding floor"
    message = (
        f"{info.method} did not converge: stopped ({info.stop_reason}) after {info.iterations} "
        f"iterations with residual {info.residual:.3g} > {limit}. {_failing_items(info)}"
        f"{_ADVICE.get(info.stop_reason, '')}Fix: {hint}."
    )
    if on_fail == "raise":
        raise NotConvergedError(message)
    if on_fail == "warn":
        warnings.warn(message, NotConvergedWarning, stacklevel=_caller_stacklevel())
        return result, info
    message += " Falling back to Cholesky."
    warnings.warn(message, NotConvergedWarning, stacklevel=_caller_stacklevel())
    fallback, items = exact()
    method = f"cholesky (fallback from {info.method})"
    info = replace(
        info,
        residual=worst(items),
        item_residuals=per_item(items),
        converged=True,
        method=method,
        stop_reason="fallback",
    )
    return fallback, info


def _failing_items(info: InverseInfo) -> str:
    """The batch items above ``info.limit`` with their residuals, for a batch of several matrices."""
    if len(info.item_residuals) < 2:
        return ""
    pairs = zip(info.item_residuals, info.item_converged())
    failing = [f"{i} (residual {r:.3g})" for i, (r, ok) in enumerate(pairs) if not ok]
    return (
        f"Not converged: batch item(s) {_listing(failing)} of {len(info.item_residuals)} "
        "(flattened indices, as in info.item_residuals). "
    )


def _listing(entries: list[str], most: int = 5) -> str:
    """The first ``most`` entries joined by commas, and how many more there are."""
    more = f" and {len(entries) - most} more" if len(entries) > most else ""
    return ", ".join(entries[:most]) + more


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the hyperinf package, seen from the function calling this."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and Path(frame.f_code.co_filename).is_relative_to(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def check_square(A: Tensor) -> int:
    """Size ``d`` of ``A [..., d, d]``; ValueError for other shapes."""
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape [..., d, d]; got {tuple(A.shape)}")
    return A.shape[-1]


def check_options(on_fail: str, max_iter: int) -> None:
    """ValueError for an unknown ``on_fail`` or a negative ``max_iter``."""
    if on_fail not in _ON_FAIL:
        raise ValueError(f"on_fail must be one of {_ON_FAIL}; got {on_fail!r}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0; got {max_iter}")


def as_columns(A: Tensor, b: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``b [..., d]`` or ``[..., d, k]`` as ``[N, d, k]`` and return how to undo it."""
    batch, d = A.shape[:-2], A.shape[-1]
    vector = b.dim() == A.dim() - 1
    columns = b.unsqueeze(-1) if vector else b
    if columns.shape[:-2] != batch or columns.shape[-2] != d:
        expected = f"{(*batch, d)} or {(*batch, d, 'k')}"
        raise ValueError(f"b must have shape {expected}; got {tuple(b.shape)}")
    flat = columns.reshape(-1, d, columns.shape[-1])

    def unflatten(X: Tensor) -> Tensor:
        X = X.reshape(columns.shape)
        return X.squeeze(-1) if vector else X

    return flat, unflatten


def column_norms(B: Tensor) -> Tensor:
    """Norm of each column of ``B [N, d, k]``, floored so zero columns do not divide by zero."""
    return torch.linalg.vector_norm(B, dim=-2).clamp_min(torch.finfo(B.dtype).tiny)


def relative_residuals(R: Tensor, B: Tensor) -> Tensor:
    """``||r|| / ||b||`` per column."""
    return torch.linalg.vector_norm(R, dim=-2) / column_norms(B)


def per_item(values: Tensor) -> tuple[float, ...]:
    """Worst entry of each batch item of ``values [N, ...]`` (the columns of a solve, or one norm)."""
    return tuple(values.reshape(values.shape[0], -1).amax(1).tolist()) if values.numel() else ()


def worst(values: Tensor) -> float:
    """Largest entry as a float (NaN if any entry is NaN; 0 for an empty batch)."""
    return float(values.max()) if values.numel() else 0.0
