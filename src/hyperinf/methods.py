"""Influence methods: each turns block vectors ``V_l`` (``[m, r, d]``) into ``h_l ~ A_l^{-1} V_l``.

All methods share the damped curvature ``A_l = G_l + lambda_l I`` (or its flattened-FIM /
exact-Hessian / exact-GGN analogue) with the same ``lambda_l``, so they differ only in how they invert:

- ``hyperinf``: Schulz's iteration on the ``d x d`` GFIM; ``h = V X``.
- ``hyperinf-fim``: Schulz on the flattened ``rd x rd`` FIM (small blocks only).
- ``exact`` / ``exact-fim``: Cholesky on the same matrices (the ground truth of the above).
- ``exact-hessian``: Cholesky on the exact Hessian of the selected parameters + damping.
- ``exact-ggn``: Cholesky on the exact generalized Gauss-Newton matrix ``(1/n) sum_i J_i^T H_i J_i``
  of the selected parameters + damping (``J_i``: Jacobian of example i's outputs, ``H_i``: Hessian of
  its loss in them; needs the engine's ``output_fn`` and ``output_loss``): positive semi-definite,
  the matrix K-FAC / EK-FAC approximate.
- ``datainf``: the closed form of Kwon et al., one pass over the training gradients.
- ``lissa``: ``lissa_iters`` terms of the Neumann series of ``A / s``, ``s >= lambda_max`` (converges).
- ``tracin``: ``h = v`` (no curvature).
- ``kfac``: per block, the Kronecker product of the input and output-gradient covariances
  (float64 eigenbases ``Q_r``, ``Q_d``), ``h = Q_r [(Q_r^T V Q_d) / (e_r e_d^T + lambda)] Q_d^T``.
- ``ekfac``: the same bases, eigenvalues ``Lambda = (1/n) sum_k (Q_r^T G_k Q_d)^2`` refit on the
  per-example gradients (one more pass over the training data when the preconditioner is built).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from hyperinf import linalg
from hyperinf.config import InfluenceConfig, SchulzOptions
from hyperinf.curvature import CurvatureAccumulator, KroneckerAccumulator
from hyperinf.errors import ConfigurationError, NotFittedError, NotSPDError
from hyperinf.preconditioners import (
    BlockDiagnostics,
    DataInfPreconditioner,
    GradientSource,
    IdentityPreconditioner,
    InversePreconditioner,
    KroneckerPreconditioner,
    LissaPreconditioner,
    Preconditioner,
    Reduce,
)


@dataclass
class FittedInputs:
    """What a method may build from: the fitted curvature (Hessian, Kronecker factors, GGN), and a pass over the training data."""

    curvature: CurvatureAccumulator
    config: InfluenceConfig
    hessian: torch.Tensor | None = None
    train_gradients: GradientSource | None = None
    reduce: Reduce | None = None
    kronecker: KroneckerAccumulator | None = None
    ggn: torch.Tensor | None = None

    def damping(self) -> dict[str, float]:
        """``lambda_l`` of every block under the run's damping options (the same for every method)."""
        c, mode = self.config.score.damping, self.config.score.damping_mode
        return {b.name: self.curvature.damping(b, c, mode) for b in self.curvature.blocks}


CURVATURE_KINDS = {
    "gfim": "the GFIM",
    "fim": "the flattened FIM",
    "hessian": "the exact Hessian",
    "ggn": "the exact GGN",
    "kronecker": "the Kronecker factors",
}
"""The sums pass 1 can accumulate, by the name of a method's flag saying it needs them."""


@dataclass(frozen=True)
class Method:
    """One influence method: what it needs from pass 1, and how it builds its preconditioner.

    ``gfim``: the ``d x d`` GFIM is accumulated; ``fim``: the flattened ``rd x rd`` FIM is; ``hessian``: the exact Hessian is; ``ggn``: the exact GGN is;
    ``kronecker``: the token covariances of each block's inputs and output gradients are; ``train_pass``: every ``apply`` sums over the training gradients (no self-influence then,
    and pass 2 cannot skip per-example gradients); ``check`` refuses configurations the method
    cannot run with, before any data is read.
    """

    name: str
    build: Callable[[FittedInputs, list[BlockDiagnostics]], Preconditioner]
    gfim: bool = False
    fim: bool = False
    hessian: bool = False
    ggn: bool = False
    kronecker: bool = False
    train_pass: bool = False
    check: Callable[[InfluenceConfig], None] | None = None

    def needs(self) -> tuple[str, ...]:
        """The pass-1 sums this method builds from, by name (a subset of :data:`CURVATURE_KINDS`)."""
        return tuple(kind for kind in CURVATURE_KINDS if getattr(self, kind))


def _damped(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    return matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


def _invert_grouped(
    iterative: bool,
    matrices: Mapping[str, torch.Tensor],
    damping: Mapping[str, float],
    diagnostics: list[BlockDiagnostics],
    options: SchulzOptions,
) -> tuple[dict[str, torch.Tensor], list[BlockDiagnostics]]:
    """Invert every matrix (Schulz when ``iterative``, else Cholesky), stacking equal sizes into one batched call;
    the diagnostics then say how each block's Schulz run ended."""
    outcomes: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[int, torch.device], list[str]] = {}
    for name, matrix in matrices.items():
        groups.setdefault((matrix.shape[0], matrix.device), []).append(name)
    inverses: dict[str, torch.Tensor] = {}
    for names in groups.values():
        stack = torch.stack([matrices[n] for n in names])
        if not iterative:
            inverses.update(zip(names, linalg.cholesky_inverse(stack).unbind(0)))
            continue
        lower = torch.tensor([damping[n] for n in names], dtype=stack.dtype, device=stack.device)
        result, info = linalg.schulz_inverse(
            stack,
            max_iter=options.max_iter,
            tol=options.tol,
            init=options.init,
            order=options.order,
            lower_bound=lower,
            on_fail=options.on_nonconvergence,
        )
        for n, residual, converged in zip(names, info.item_residuals, info.item_converged()):
            outcomes[n] = {"iterations": info.iterations, "residual": residual, "converged": converged}
        inverses.update(zip(names, result.unbind(0)))
    return inverses, [replace(d, **outcomes.get(d.block, {})) for d in diagnostics]


def _block_inverse(fim: bool, iterative: bool) -> Callable[[FittedInputs, list[BlockDiagnostics]], Preconditioner]:
    """Per block, invert the damped GFIM (``h = V X``) or flattened FIM (``vec(h) = vec(V) X``): Schulz or Cholesky."""

    def build(fitted: FittedInputs, diagnostics: list[BlockDiagnostics]) -> Preconditioner:
        damping, blocks = fitted.damping(), fitted.curvature.blocks
        curvature = fitted.curvature.flat_fim if fim else fitted.curvature.gfim
        matrices = {b.name: _damped(curvature(b.name), damping[b.name]) for b in blocks}
        inverses, diagnostics = _invert_grouped(iterative, matrices, damping, diagnostics, fitted.config.schulz)
        name = diagnostics[0].method
        if fim:
            return InversePreconditioner(
                name, blocks, diagnostics, right={}, flat_groups=[((n,), x) for n, x in inverses.items()]
            )
        return InversePreconditioner(name, blocks, diagnostics, right=inverses)

    return build


def _exact_curvature(ggn: bool) -> Callable[[FittedInputs, list[BlockDiagnostics]], Preconditioner]:
    """Cholesky on the exact GGN or Hessian of all selected parameters, each block's coordinates damped by its ``lambda_l``."""
    name, what = ("exact-ggn", "exact GGN") if ggn else ("exact-hessian", "exact Hessian")

    def build(fitted: FittedInputs, diagnostics: list[BlockDiagnostics]) -> Preconditioner:
        matrix = fitted.ggn if ggn else fitted.hessian
        if matrix is None:
            raise NotFittedError(f"method {name!r} needs the {what}: call fit(train_loader, methods=[{name!r}]).")
        blocks, damping = fitted.curvature.blocks, fitted.damping()
        diagonal = torch.cat([torch.full((b.num_params,), damping[b.name], dtype=matrix.dtype) for b in blocks])
        damped = matrix + torch.diag(diagonal.to(matrix.device))
        try:
            inverse = linalg.cholesky_inverse(damped)
        except NotSPDError:
            lowest = float(torch.linalg.eigvalsh(damped.double())[0])
            if ggn or lowest >= 0:
                raise
            raise NotSPDError(
                f"the damped exact Hessian of the selected blocks is indefinite (most negative eigenvalue {lowest:.4g}): "
                "the loss is not convex in these parameters (e.g. a network with hidden layers), so -v^T H^{-1} g has no "
                "influence meaning. Use 'exact-ggn' (the exact Gauss-Newton matrix: the Hessian without the network's second "
                "derivatives, positive semi-definite) or a Fisher method ('exact', 'hyperinf'), "
                f"or a damping above {-lowest:.4g} (damping_mode='absolute')."
            ) from None
        return InversePreconditioner(
            name, blocks, diagnostics, right={}, flat_groups=[([b.name for b in blocks], inverse)]
        )

    return build


def _lissa(fitted: FittedInputs, diagnostics: list[BlockDiagnostics]) -> Preconditioner:
    damping, scale, matrices = fitted.damping(), {}, {}
    for b in fitted.curvature.blocks:
        matrices[b.name] = _damped(fitted.curvature.gfim(b.name), damping[b.name])
        scale[b.name] = _lissa_scale(b.name, matrices[b.name], fitted.config.lissa.scale)
    return LissaPreconditioner(fitted.curvature.blocks, diagnostics, matrices, scale, fitted.config.lissa.iters)


def _lissa_scale(block: str, matrix: torch.Tensor, given: float | None) -> float:
    """A bound on ``lambda_max`` when no scale is given; a given one must make the series converge."""
    if given is None:
        return float(linalg.spectral_bounds(matrix)[1])
    largest = float(torch.linalg.eigvalsh(matrix.double())[-1])
    if given <= largest / 2:
        raise ConfigurationError(
            f"lissa_scale={given:g} makes LiSSA diverge on block {block!r}: its damped curvature has "
            f"lambda_max = {largest:.4g}, and the series converges only for a scale above lambda_max / 2 = "
            f"{largest / 2:.4g}. Leave lissa_scale=None (a bound on lambda_max) or raise it."
        )
    return given


def _training_pass(fitted: FittedInputs, method: str) -> tuple[GradientSource, Reduce]:
    """The fit's training gradients and the sum across processes, for a method that passes over them."""
    if fitted.train_gradients is None:
        raise NotFittedError(
            f"method {method!r} sums over the training gradients of the fit, and this engine has no training "
            "loader (a loaded fit): pass train_loader= to load_fit."
        )
    return fitted.train_gradients, fitted.reduce or (lambda tensors, count: count)


def _datainf(fitted: FittedInputs, diagnostics: list[BlockDiagnostics]) -> Preconditioner:
    source, reduce = _training_pass(fitted, "datainf")
    return DataInfPreconditioner(fitted.curvature.blocks, diagnostics, fitted.damping(), source, reduce)


def _check_datainf(config: InfluenceConfig) -> None:
    if config.score.damping == 0:
        raise ConfigurationError(
            "method 'datainf' divides by the damping lambda, so damping=0 is undefined for it: "
            "use damping > 0 (default 0.1)."
        )


def _tracin(fitted: FittedInputs, diagnostics: list[BlockDiagnostics]) -> Preconditioner:
    return IdentityPreconditioner("tracin", fitted.curvature.blocks, diagnostics)


Eigen = tuple[torch.Tensor, torch.Tensor]


def _kronecker_eigen(fitted: FittedInputs, method: str) -> dict[str, tuple[Eigen, Eigen]]:
    """Per block, float64 ``eigh`` of the Kronecker factors in layout order: ``((e_r, Q_r), (e_d, Q_d))``."""
    if fitted.kronecker is None:
        raise NotFittedError(
            f"method {method!r} needs the Kronecker factors: call fit(train_loader, methods=[{method!r}])."
        )
    return {b.name: tuple(torch.linalg.eigh(f) for f in fitted.kronecker.factors(b)) for b in fitted.curvature.blocks}


def _kfac(fitted: FittedInputs, diagnostics: list[BlockDiagnostics]) -> Preconditioner:
    """K-FAC: ``Lambda = e_r e_d^T``, the eigenvalues of ``R (x) D`` (see :meth:`KroneckerAccumulator.factors` for the scale)."""
    dtype, bases, eigenvalues = fitted.config.fit.torch_dtype, {}, {}
    for name, ((e_r, q_r), (e_d, q_d)) in _kronecker_eigen(fitted, "kfac").items():
        bases[name] = (q_r.to(dtype), q_d.to(dtype))
        eigenvalues[name] = torch.outer(e_r.clamp_min(0.0), e_d.clamp_min(0.0)).to(dtype)
    return KroneckerPreconditioner("kfac", fitted.curvature.blocks, diagnostics, bases, eigenvalues)


def _ekfac(fitted: FittedInputs, diagnostics: list[BlockDiagnostics]) -> Preconditioner:
    """EK-FAC: K-FAC's bases, ``Lambda = (1/n) sum_k (Q_r^T G_k Q_d)^2`` from one pass over the training gradients.

    With orthonormal bases ``sum Lambda = (1/n) sum_k ||G_k||_F^2``, so the relative damping
    ``lambda = c / (n r d) sum_k ||G_k||^2`` is exactly ``c`` times the mean of ``Lambda``: with
    ``c = 0.1`` (the default), kronfluence's heuristic damping (its ``damping=None``; its default
    is an absolute ``1e-8``, our ``damping_mode="absolute"``).
    """
    source, reduce = _training_pass(fitted, "ekfac")
    dtype = fitted.config.fit.torch_dtype
    bases = {
        name: (q_r.to(dtype), q_d.to(dtype)) for name, ((_, q_r), (_, q_d)) in _kronecker_eigen(fitted, "ekfac").items()
    }
    sums = {
        name: torch.zeros(q_r.shape[0], q_d.shape[0], dtype=dtype, device=q_r.device)
        for name, (q_r, q_d) in bases.items()
    }
    count = 0
    for batch in source():
        count += batch.batch_size
        for name, (q_r, q_d) in bases.items():
            sums[name] += (q_r.T @ batch.grads[name].to(q_r) @ q_d).square().sum(0)
    count = reduce(list(sums.values()), count)
    eigenvalues = {name: total / count for name, total in sums.items()}
    return KroneckerPreconditioner("ekfac", fitted.curvature.blocks, diagnostics, bases, eigenvalues)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to :data:`REGISTRY` (its name must be new)."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


for _method in (
    Method("hyperinf", _block_inverse(fim=False, iterative=True), gfim=True),
    Method("hyperinf-fim", _block_inverse(fim=True, iterative=True), fim=True),
    Method("exact", _block_inverse(fim=False, iterative=False), gfim=True),
    Method("exact-fim", _block_inverse(fim=True, iterative=False), fim=True),
    Method("exact-hessian", _exact_curvature(ggn=False), hessian=True),
    Method("exact-ggn", _exact_curvature(ggn=True), ggn=True),
    Method("datainf", _datainf, train_pass=True, check=_check_datainf),
    Method("lissa", _lissa, gfim=True),
    Method("tracin", _tracin),
    Method("kfac", _kfac, kronecker=True),
    Method("ekfac", _ekfac, kronecker=True),
):
    register(_method)


def method_names() -> tuple[str, ...]:
    """Names of every registered method, in registration order."""
    return tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; a clear error listing the choices otherwise."""
    if name not in REGISTRY:
        raise ConfigurationError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_preconditioner(name: str, fitted: FittedInputs) -> Preconditioner:
    """Build method ``name``'s preconditioner from fitted curvature, with one diagnostics row per block."""
    method = get_method(name)
    if method.check is not None:
        method.check(fitted.config)
    diagnostics = [
        BlockDiagnostics(b.name, name, *b.shape, damping)
        for b, damping in zip(fitted.curvature.blocks, fitted.damping().values())
    ]
    return method.build(fitted, diagnostics)
