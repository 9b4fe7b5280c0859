"""Preconditioners: fitted maps from block vectors ``V_l`` (``[m, r, d]``) to ``h_l ~ A_l^{-1} V_l``.

Each method of :mod:`hyperinf.methods` builds one of these from the fitted curvature; the
engine only ever calls :meth:`Preconditioner.apply`. Every preconditioner keeps one
:class:`BlockDiagnostics` per block, so what an iterative inverse did is reported by block name.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from hyperinf import linalg
from hyperinf.blocks import Block
from hyperinf.errors import ConfigurationError, NotConvergedWarning
from hyperinf.gradients import BatchGradients

Vectors = Mapping[str, torch.Tensor]
GradientSource = Callable[[], Iterable[BatchGradients]]
Reduce = Callable[[list[torch.Tensor], int], int]  # sums tensors in place across processes, returns the total count

# LiSSA warns when ||v - A h|| / ||v|| stays above this: h is then closer to a rescaled v (TracIn)
# than to A^{-1} v.
LISSA_FAR = 0.5


@dataclass(frozen=True)
class BlockDiagnostics:
    """What one method did on one block: its damping, for iterative inverses how it ended, and for
    K-FAC / EK-FAC the range of the eigenvalues ``Lambda`` it divides by (before damping)."""

    block: str
    method: str
    r: int
    d: int
    damping: float
    iterations: int | None = None
    residual: float | None = None
    converged: bool | None = None
    eig_min: float | None = None
    eig_max: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Preconditioner(ABC):
    """Maps per-block vectors ``{name: [m, r, d]}`` to ``{name: [m, r, d]}``, approximately ``A^{-1} V``."""

    def __init__(self, name: str, blocks: Sequence[Block], diagnostics: list[BlockDiagnostics]) -> None:
        self.name = name
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
        super().__init__(name, blocks, diagnostics)
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
    """LiSSA: ``iterations`` terms of the Neumann series of ``A / s`` (:func:`hyperinf.linalg.neumann_series`).

    Along an eigen-direction of ``A`` with eigenvalue ``mu`` it returns ``(1 - (1 - mu/s)^J) / mu``
    times the input, ``J`` = ``iterations``: the inverse once ``(1 - mu/s)^J`` is small, a
    rescaled identity (TracIn) for ``mu << s / J``. Its diagnostics hold the last call's residual per block.
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        diagnostics: list[BlockDiagnostics],
        matrices: Mapping[str, torch.Tensor],
        scale: Mapping[str, float],
        iterations: int,
    ) -> None:
        super().__init__("lissa", blocks, diagnostics)
        self.matrices, self.scale, self.iterations = dict(matrices), dict(scale), iterations
        self._warned = False

    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        out, diagnostics = {}, []
        for diag in self.diagnostics:
            v = vectors[diag.block]
            columns = v.reshape(-1, v.shape[-1]).T  # solve A x = v_row for every row of every vector
            x, info = linalg.neumann_series(
                self.matrices[diag.block],
                columns.to(self.matrices[diag.block].dtype),
                max_iter=self.iterations,
                scale=self.scale[diag.block],
                on_fail="ignore",
            )
            out[diag.block] = x.T.reshape(v.shape).to(v.dtype)
            diagnostics.append(
                replace(diag, iterations=info.iterations, residual=info.residual, converged=info.converged)
            )
        self.diagnostics = diagnostics
        self._warn_if_far()
        return out

    def _warn_if_far(self) -> None:
        far = [d for d in self.diagnostics if d.residual is not None and d.residual > LISSA_FAR]
        if far and not self._warned:
            self._warned = True
            worst = max(far, key=lambda d: d.residual or 0.0)
            warnings.warn(
                f"lissa stopped after {self.iterations} iterations far from the inverse on {len(far)} of "
                f"{len(self.diagnostics)} block(s) (worst: {worst.block!r}, residual ||v - A h|| / ||v|| = "
                f"{worst.residual:.3g}): its scores are close to a rescaled TracIn there. Raise lissa_iters "
                "or use 'hyperinf' / 'exact'.",
                NotConvergedWarning,
                stacklevel=4,
            )


class DataInfPreconditioner(Preconditioner):
    """DataInf: ``h = (1/lam)(v - (1/n) sum_i <g_i, v> / (lam + ||g_i||^2) g_i)``, one training pass per call."""

    def __init__(
        self,
        blocks: Sequence[Block],
        diagnostics: list[BlockDiagnostics],
        damping: Mapping[str, float],
        train_gradients: GradientSource,
        reduce: Reduce,
    ) -> None:
        super().__init__("datainf", blocks, diagnostics)
        self.damping = dict(damping)
        self.train_gradients = train_gradients
        self.reduce = reduce

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


class KroneckerPreconditioner(Preconditioner):
    """K-FAC / EK-FAC: ``h = Q_r [(Q_r^T V Q_d) / (Lambda + lambda)] Q_d^T`` with per-block bases and eigenvalues.

    ``bases[name] = (Q_r, Q_d)`` are orthonormal ``r x r`` and ``d x d``; ``eigenvalues[name]`` is
    ``Lambda`` (``r x d``), the curvature's diagonal in the basis ``Q_r (x) Q_d``.
    """

    def __init__(
        self,
        name: str,
        blocks: Sequence[Block],
        diagnostics: list[BlockDiagnostics],
        bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        eigenvalues: Mapping[str, torch.Tensor],
    ) -> None:
        self.bases = dict(bases)
        self.eigenvalues = dict(eigenvalues)
        ranges = {name: (float(values.min()), float(values.max())) for name, values in self.eigenvalues.items()}
        diagnostics = [replace(d, eig_min=ranges[d.block][0], eig_max=ranges[d.block][1]) for d in diagnostics]
        super().__init__(name, blocks, diagnostics)
        self._denominators = {d.block: self.eigenvalues[d.block] + d.damping for d in diagnostics}
        singular = [block for block, values in self._denominators.items() if float(values.min()) <= 0]
        if singular:
            raise ConfigurationError(
                f"method {name!r} would divide by zero on block(s) {', '.join(singular)}: their curvature has a zero "
                "eigenvalue and the damping is 0. Use damping > 0."
            )

    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        out = {}
        for name, v in vectors.items():
            rows, columns = self.bases[name]
            rotated = rows.T @ v.to(rows.dtype) @ columns
            out[name] = (rows @ (rotated / self._denominators[name]) @ columns.T).to(v.dtype)
        return out


class IdentityPreconditioner(Preconditioner):
    """No curvature: ``h = v`` (TracIn)."""

    def apply(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        return dict(vectors)
