"""Solvers the paper compares Schulz against but no influence method uses: CG, GMRES and SOR.

Built on :mod:`hyperinf.linalg`'s conventions: ``A [..., d, d]`` handled as one batch, results
``(x, InverseInfo)``, and ``on_fail`` deciding what a run that misses its tolerance does.
Used by the convergence (Fig. 1, App. I) and inverse (App. H, Tables 9-10) experiments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hyperinf.linalg import (
    Callback,
    InverseInfo,
    OnFail,
    as_columns,
    check_options,
    check_square,
    column_norms,
    default_tol,
    exact_solve,
    finish,
    per_item,
    relative_residuals,
    solver_stop,
    stationary,
    worst,
)


def conjugate_gradient(
    A: Tensor,
    b: Tensor,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    x0: Tensor | None = None,
    on_fail: OnFail = "warn",
    callback: Callback | None = None,
) -> tuple[Tensor, InverseInfo]:
    """Solve SPD ``A x = b`` by conjugate gradients, every right-hand side at once.

    ``A [..., d, d]``, ``b [..., d]`` or ``[..., d, k]``. Stops when every column's recursive
    residual is ``<= tol`` (default :func:`default_tol`), on NaN/Inf or growth past 1e6
    (diverged), or after ``max_iter`` steps (default ``10 d``: rounding makes CG need more than
    the ``d`` steps of exact arithmetic); ``converged`` is judged on the true residual of the
    result. ``x0`` (same shape as ``b``) is the starting guess, 0 by default.
    """
    d = check_square(A)
    tol = default_tol(A.dtype) if tol is None else tol
    max_iter = 10 * d if max_iter is None else max_iter
    check_options(on_fail, max_iter)
    B, unflatten = as_columns(A, b)
    A3 = A.reshape(-1, d, d)
    X = torch.zeros_like(B) if x0 is None else as_columns(A, x0)[0].clone()
    R = torch.baddbmm(B, A3, X, alpha=-1)
    P, rr = R.clone(), (R * R).sum(-2)
    b_norm = column_norms(B)
    history: list[float] = []
    for t in range(max_iter + 1):
        history.append(worst(rr.sqrt() / b_norm))
        reason = solver_stop(history[-1], tol, at_cap=t == max_iter)
        if reason is not None:
            break
        AP = A3 @ P
        alpha = _safe_divide(rr, (P * AP).sum(-2)).unsqueeze(-2)
        X = X + alpha * P
        R = R - alpha * AP
        rr_next = (R * R).sum(-2)
        P = R + _safe_divide(rr_next, rr).unsqueeze(-2) * P
        rr = rr_next
        if callback is not None:
            callback(t + 1, unflatten(X))
    return _solver_result(A, b, X, reason, history, tol, "cg", on_fail, unflatten)


def gmres(
    A: Tensor,
    b: Tensor,
    *,
    max_iter: int | None = None,
    restart: int | None = None,
    tol: float | None = None,
    on_fail: OnFail = "warn",
    callback: Callback | None = None,
) -> tuple[Tensor, InverseInfo]:
    """Solve ``A x = b`` by GMRES (Arnoldi with re-orthogonalized Gram-Schmidt, Givens rotations).

    ``max_iter`` (default ``d``) counts Arnoldi steps in total; ``restart`` (default: none) is the
    Krylov dimension after which the method restarts from the current ``x``. Each right-hand side
    of ``b [..., d]`` / ``[..., d, k]`` has its own Krylov space; a column whose residual estimate
    reaches ``tol`` is frozen. ``converged`` is judged on the true residual of the result.
    """
    d = check_square(A)
    tol = default_tol(A.dtype) if tol is None else tol
    max_iter = d if max_iter is None else max_iter
    check_options(on_fail, max_iter)
    restart = max_iter if restart is None else restart
    B, unflatten = as_columns(A, b)
    A3 = A.reshape(-1, d, d)
    X = torch.zeros_like(B)
    b_norm = column_norms(B)
    history = [worst(relative_residuals(B, B))]
    done = history[0] <= tol
    steps = 0
    while not done and steps < max_iter:
        cycle = min(restart, max_iter - steps)
        X, cycle_history = _gmres_cycle(A3, B, X, b_norm, cycle, tol, callback, unflatten, steps)
        steps += len(cycle_history)
        history += cycle_history
        done = history[-1] <= tol or not math.isfinite(history[-1])
    reason = solver_stop(history[-1], tol, at_cap=True)
    return _solver_result(A, b, X, reason, history, tol, "gmres", on_fail, unflatten)


def _gmres_cycle(
    A: Tensor,
    B: Tensor,
    X0: Tensor,
    b_norm: Tensor,
    m: int,
    tol: float,
    callback: Callback | None,
    unflatten: Callable[[Tensor], Tensor],
    start: int,
) -> tuple[Tensor, list[float]]:
    """Up to ``m`` Arnoldi steps from ``X0 [N, d, k]``; return the new ``X``, residual estimates."""
    R0 = torch.baddbmm(B, A, X0, alpha=-1)
    beta = torch.linalg.vector_norm(R0, dim=-2)
    V = R0.new_zeros(R0.shape[0], m + 1, *R0.shape[1:])  # [N, m+1, d, k]
    V[:, 0] = R0 / beta.clamp_min(torch.finfo(beta.dtype).tiny).unsqueeze(-2)
    Rt = R0.new_zeros(*beta.shape, m, m)  # rotated Hessenberg (upper triangular) [N, k, m, m]
    g = R0.new_zeros(*beta.shape, m + 1)
    g[..., 0] = beta
    rotations: list[tuple[Tensor, Tensor]] = []
    estimate = beta / b_norm
    active = estimate > tol
    X, history = X0, []
    for i in range(m):
        column = _arnoldi_step(A, V, i)
        column, rotation = _apply_givens(column, rotations, g, i)
        rotations.append(rotation)
        Rt[..., : i + 1, i] = column[..., : i + 1]
        estimate = torch.where(active, g[..., i + 1].abs() / b_norm, estimate)
        history.append(worst(estimate))
        last = i == m - 1 or history[-1] <= tol or not math.isfinite(history[-1])
        if callback is not None or last:
            X = torch.where(active.unsqueeze(-2), _gmres_update(X0, V, Rt, g, i), X)
            if callback is not None:
                callback(start + i + 1, unflatten(X))
        active = active & (estimate > tol)
        if last:
            break
    return X, history


def _arnoldi_step(A: Tensor, V: Tensor, i: int) -> Tensor:
    """Extend the basis ``V`` by ``A V[:, i]``; return the Hessenberg column ``[N, k, i + 2]``."""
    w = A @ V[:, i]
    basis = V[:, : i + 1]
    h = torch.zeros(w.shape[0], w.shape[-1], i + 1, dtype=w.dtype, device=w.device)
    for _ in range(2):  # classical Gram-Schmidt, twice for orthogonality in finite precision
        coefficients = torch.einsum("njdk,ndk->nkj", basis, w)
        w = w - torch.einsum("njdk,nkj->ndk", basis, coefficients)
        h = h + coefficients
    norm = column_norms(w)
    V[:, i + 1] = w / norm.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-2)
    return torch.cat([h, norm.unsqueeze(-1)], dim=-1)


def _apply_givens(
    column: Tensor, rotations: list[tuple[Tensor, Tensor]], g: Tensor, i: int
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Rotate the new Hessenberg column by the earlier rotations and a new one zeroing its tail."""
    column = column.clone()
    for j, (c, s) in enumerate(rotations):
        top, bottom = column[..., j].clone(), column[..., j + 1].clone()
        column[..., j] = c * top + s * bottom
        column[..., j + 1] = c * bottom - s * top
    top, bottom = column[..., i], column[..., i + 1]
    rho = torch.hypot(top, bottom)
    safe = rho.clamp_min(torch.finfo(rho.dtype).tiny)
    c = torch.where(rho > 0, top / safe, torch.ones_like(rho))
    s = torch.where(rho > 0, bottom / safe, torch.zeros_like(rho))
    column[..., i] = rho
    g[..., i + 1] = -s * g[..., i]
    g[..., i] = c * g[..., i]
    return column, (c, s)


def _gmres_update(X0: Tensor, V: Tensor, Rt: Tensor, g: Tensor, i: int) -> Tensor:
    """``X0 + V y`` with ``y`` minimizing the residual over the first ``i + 1`` Krylov vectors."""
    y = torch.linalg.solve_triangular(Rt[..., : i + 1, : i + 1], g[..., : i + 1, None], upper=True).squeeze(-1)
    return X0 + torch.einsum("njdk,nkj->ndk", V[:, : i + 1], y)


def sor(
    A: Tensor,
    b: Tensor | None = None,
    *,
    omega: float = 1.0,
    max_iter: int = 100,
    tol: float | None = None,
    on_fail: OnFail = "warn",
    callback: Callback | None = None,
) -> tuple[Tensor, InverseInfo]:
    """Successive over-relaxation for ``A x = b`` (the inverse when ``b`` is None).

    ``(D + omega L) x_{t+1} = omega b - (omega U + (omega - 1) D) x_t``, run in the equivalent
    correction form ``x_{t+1} = x_t + omega (D + omega L)^{-1} (b - A x_t)``: one matmul and one
    triangular solve per step, the sequential row sweep done by ``solve_triangular``.
    ``omega = 1`` is Gauss-Seidel; it converges for SPD ``A`` when ``0 < omega < 2``.
    """
    d = check_square(A)
    lower = torch.tril(A, -1) * omega + torch.diag_embed(A.diagonal(dim1=-2, dim2=-1))
    lower = lower.reshape(-1, d, d)

    def correct(R: Tensor) -> Tensor:
        return omega * torch.linalg.solve_triangular(lower, R, upper=False)

    hint = "SOR converges for SPD A only with 0 < omega < 2; try omega=1, raise max_iter, or cg"
    method = f"sor(omega={omega})"
    return stationary(A, b, correct, max_iter, tol, on_fail, callback, method, hint, d)


def _solver_result(
    A: Tensor,
    b: Tensor,
    X: Tensor,
    reason: str,
    history: list[float],
    tol: float,
    method: str,
    on_fail: OnFail,
    unflatten: Callable[[Tensor], Tensor],
) -> tuple[Tensor, InverseInfo]:
    """Measure the true residual of a Krylov result and build its info (and failure handling)."""
    B, _ = as_columns(A, b)
    R = torch.baddbmm(B, A.reshape(-1, *A.shape[-2:]), X, alpha=-1)
    items = relative_residuals(R, B)
    residual = worst(items)
    if reason != "diverged" and residual <= tol:
        reason = "tol"
    elif reason == "tol":
        reason = "stalled"  # the recursive residual reached tol, the true one did not
    converged = reason == "tol"
    info = InverseInfo(len(history) - 1, residual, converged, method, tol, reason, tuple(history), per_item(items))
    hint = "raise max_iter, or use float64 / more damping when A is ill-conditioned"
    return finish(unflatten(X), info, on_fail, lambda: exact_solve(A, b), hint)


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den`` is 0 (finished columns of CG)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)
