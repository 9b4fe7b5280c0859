"""Influence methods: each turns block vectors ``V_l`` (``[m, r, d]``) into ``h_l ~ A_l^{-1} V_l``.

All methods share the damped curvature ``A_l = G_l + lambda_l I`` (or its flattened-FIM /
exact-Hessian analogue) with the same ``lambda_l``, so they differ only in how they invert:

- ``hyperinf``: Schulz's iteration on the ``d x d`` GFIM; ``h = V X``.
- ``hyperinf-fim``: Schulz on the flattened ``rd x rd`` FIM (small blocks only).
- ``exact`` / ``exact-fim``: Cholesky on the same matrices (the ground truth of the above).
- ``exact-hessian``: Cholesky on the exact Hessian of the selected parameters + damping.
- ``datainf``: the closed form of Kwon et al., one pass over the training gradients.
- ``lissa``: ``r <- v + (I - A/s) r`` on the GFIM, scaled by ``s >= lambda_max`` so it converges.
- ``tracin``: ``h = v`` (no curvature).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from hyperinf import linalg
from hyperinf.blocks import Block
from hyperinf.config import InfluenceConfig
from hyperinf.curvature import CurvatureAccumulator
from hyperinf.gradients import BatchGradients

Vectors = Mapping[str, torch.Tensor]
GradientSource = Callable[[], Iterable[BatchGradients]]
Reduce = Callable[[list[torch.Tensor], int], int]  # sums tensors in place across processes, returns the total count

METHODS = ("hyperinf", "hyperinf-fim", "exact", "exact-fim", "exact-hessian", "datainf", "lissa", "tracin")
NEEDS_FIM = frozenset({"hyperinf-fim", "exact-fim"})
NEEDS_HESSIAN = frozenset({"exact-hessian"})
NEEDS_TRAIN_PASS = frozenset({"datainf"})


@dataclass
class BlockDiagnostics:
    """What one method did on one block: its damping and, for iterative inverses, how it ended."""

    block: str
    method: str
    r: int
    d: int
    damping: float
    iterations: int | None = None
    residual: float | None = None
    converged: bool | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Preconditioner(ABC):
    """Maps per-block vectors ``{name: [m, r, d]}`` to ``{name: [m, r, d]}``, approximately ``A^{-1} V``."""

    name: str
    per_example: bool = True  # False where each apply() costs a pass over the training data

    def __init__(self, blocks: Sequence[Block], diagnostics: list[BlockDiagnostics]) -> None:
        self.blocks = list(blocks)
        self.diagnostics = diagnostics

    @abstractmethod
    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        """``h_l`` for every block, same shapes as ``vectors``."""


class InversePreconditioner(Preconditioner):
    """Applies explicit inverses: ``V_l X_l`` on the GFIM side, or ``vec(V) X`` over groups of blocks."""

    def __init__(
        self,
        name: str,
        blocks: Sequence[Block],
        diagnostics: list[BlockDiagnostics],
        right: Mapping[str, torch.Tensor],
        flat_groups: Sequence[tuple[Sequence[str], torch.Tensor]] = (),
    ) -> None:
        super().__init__(blocks, diagnostics)
        self.name = name
        self.right = dict(right)
        self.flat_groups = list(flat_groups)

    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        out = {name: vectors[name] @ inverse for name, inverse in self.right.items()}
        for names, inverse in self.flat_groups:
            shapes = [vectors[n].shape for n in names]
            m = shapes[0][0]
            flat = torch.cat([vectors[n].reshape(m, -1) for n in names], dim=1) @ inverse
            for n, piece, shape in zip(names, flat.split([s[1] * s[2] for s in shapes], dim=1), shapes):
                out[n] = piece.reshape(shape)
        return out


class LissaPreconditioner(Preconditioner):
    """LiSSA's truncated Neumann series on the damped GFIM: ``r_{j+1} = v + (I - A/s) r_j``, ``h = r_J / s``."""

    name = "lissa"

    def __init__(
        self,
        blocks: Sequence[Block],
        diagnostics: list[BlockDiagnostics],
        gfim: Mapping[str, torch.Tensor],
        damping: Mapping[str, float],
        scale: Mapping[str, float],
        iterations: int,
    ) -> None:
        super().__init__(blocks, diagnostics)
        self.gfim, self.damping, self.scale, self.iterations = dict(gfim), dict(damping), dict(scale), iterations

    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        out = {}
        for name, v in vectors.items():
            g, lam, s = self.gfim[name], self.damping[name], self.scale[name]
            r = v
            for _ in range(self.iterations):
                r = v + r - (r @ g + lam * r) / s
            out[name] = r / s
        return out


class DataInfPreconditioner(Preconditioner):
    """DataInf: ``h = (1/lam)(v - (1/n) sum_i <g_i, v> / (lam + ||g_i||^2) g_i)``, one training pass per call."""

    name = "datainf"
    per_example = False

    def __init__(
        self,
        blocks: Sequence[Block],
        diagnostics: list[BlockDiagnostics],
        damping: Mapping[str, float],
        train_gradients: GradientSource,
        reduce: Reduce | None = None,
    ) -> None:
        super().__init__(blocks, diagnostics)
        self.damping = dict(damping)
        self.train_gradients = train_gradients
        self.reduce = reduce or _one_process

    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        correction = {name: torch.zeros_like(v) for name, v in vectors.items()}
        count = 0
        for batch in self.train_gradients():
            count += batch.batch_size
            for name, v in vectors.items():
                g = batch.grads[name].to(v.dtype)
                lam = self.damping[name]
                weights = torch.einsum("brd,mrd->bm", g, v) / (lam + g.square().sum(dim=(1, 2))).unsqueeze(1)
                correction[name] += torch.einsum("bm,brd->mrd", weights, g)
        count = self.reduce(list(correction.values()), count)
        return {name: (v - correction[name] / count) / self.damping[name] for name, v in vectors.items()}


class TracInPreconditioner(Preconditioner):
    """No curvature: ``h = v``."""

    name = "tracin"

    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        return dict(vectors)


def build_preconditioner(
    method: str,
    curvature: CurvatureAccumulator,
    config: InfluenceConfig,
    *,
    hessian: torch.Tensor | None = None,
    train_gradients: GradientSource | None = None,
    reduce: Reduce | None = None,
) -> Preconditioner:
    """Build ``method``'s preconditioner from fitted curvature (and the Hessian / a gradient source).

    ``reduce`` sums DataInf's pass over the training gradients across processes (distributed runs).
    """
    blocks = curvature.blocks
    damping = {b.name: curvature.damping(b, config.damping, config.damping_mode) for b in blocks}
    diagnostics = [BlockDiagnostics(b.name, method, *b.shape, damping[b.name]) for b in blocks]
    if method in ("hyperinf", "exact"):
        matrices = {b.name: _damped(curvature.gfim(b.name), damping[b.name]) for b in blocks}
        inverses = _invert_grouped(method, matrices, damping, diagnostics, config)
        return InversePreconditioner(method, blocks, diagnostics, right=inverses)
    if method in ("hyperinf-fim", "exact-fim"):
        matrices = {b.name: _damped(curvature.flat_fim(b.name), damping[b.name]) for b in blocks}
        inverses = _invert_grouped(method.removesuffix("-fim"), matrices, damping, diagnostics, config)
        return InversePreconditioner(method, blocks, diagnostics, right={}, flat_groups=[((n,), x) for n, x in inverses.items()])
    if method == "exact-hessian":
        if hessian is None:
            raise ValueError("exact-hessian needs the Hessian of the selected blocks")
        diagonal = torch.cat([torch.full((b.num_params,), damping[b.name], dtype=hessian.dtype) for b in blocks])
        inverse = linalg.cholesky_inverse(hessian + torch.diag(diagonal.to(hessian.device)))
        return InversePreconditioner(method, blocks, diagnostics, right={}, flat_groups=[([b.name for b in blocks], inverse)])
    if method == "lissa":
        gfim = {b.name: curvature.gfim(b.name) for b in blocks}
        scale = {}
        for b, diag in zip(blocks, diagnostics):
            _, upper = linalg.spectral_bounds(_damped(gfim[b.name], damping[b.name]))
            scale[b.name] = config.lissa_scale or float(upper)
            diag.iterations = config.lissa_iters
        return LissaPreconditioner(blocks, diagnostics, gfim, damping, scale, config.lissa_iters)
    if method == "datainf":
        if train_gradients is None:
            raise ValueError("datainf needs a source of training gradients")
        return DataInfPreconditioner(blocks, diagnostics, damping, train_gradients, reduce)
    if method == "tracin":
        return TracInPreconditioner(blocks, diagnostics)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _one_process(tensors: list[torch.Tensor], count: int) -> int:
    return count


def _damped(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    return matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


def _invert_grouped(
    kind: str,
    matrices: Mapping[str, torch.Tensor],
    damping: Mapping[str, float],
    diagnostics: list[BlockDiagnostics],
    config: InfluenceConfig,
) -> dict[str, torch.Tensor]:
    """Invert every matrix, stacking those of equal size into one batched call."""
    by_size: dict[int, list[str]] = {}
    for name, matrix in matrices.items():
        by_size.setdefault(matrix.shape[0], []).append(name)
    diag_of = {d.block: d for d in diagnostics}
    inverses: dict[str, torch.Tensor] = {}
    for names in by_size.values():
        stack = torch.stack([matrices[n] for n in names])
        if kind == "exact":
            result = linalg.cholesky_inverse(stack)
        else:
            lower = torch.tensor([damping[n] for n in names], dtype=stack.dtype, device=stack.device)
            result, infos = linalg.schulz_inverse(
                stack,
                max_iter=config.schulz_max_iter,
                tol=config.schulz_tol,
                init=config.schulz_init,
                order=config.schulz_order,
                lower_bound=lower,
                on_fail=config.on_nonconvergence,
            )
            for n, residual, converged in zip(names, infos.item_residuals, infos.item_converged()):
                diag_of[n].iterations = infos.iterations
                diag_of[n].residual = residual
                diag_of[n].converged = converged
        inverses.update(zip(names, result.unbind(0)))
    return inverses
