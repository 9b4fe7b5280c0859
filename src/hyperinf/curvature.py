"""Streamed, mergeable curvature accumulators: GFIM and flattened FIM per block, damping, Kronecker factors.

Per block ``l`` with per-sample gradients ``g_i`` (``r x d``) the accumulator keeps plain sums:
``gram = sum_i g_i^T g_i`` (``d x d``), ``sq_norm = sum_i ||g_i||_F^2`` and, for small blocks,
``fim = sum_i vec(g_i) vec(g_i)^T`` (``rd x rd``). Memory does not grow with the number of
examples, and two accumulators over disjoint shards add up to the accumulator of their union
(``merge``, or ``all_reduce`` of :meth:`CurvatureAccumulator.tensors`). :class:`KroneckerAccumulator`
keeps K-FAC's token sums the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from hyperinf.blocks import Block
from hyperinf.errors import ConfigurationError, DeadBlockWarning, NotFittedError
from hyperinf.gradients import TokenFactors

DampingMode = Literal["relative", "gfim", "absolute"]


class _Sums:
    """Running sums named by :meth:`named_tensors`: summed across processes, saved and loaded by name."""

    count: int

    def named_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """Every running sum, in a fixed order (for ``all_reduce`` across processes)."""
        return list(self.named_tensors().values())

    def load(self, tensors: Mapping[str, torch.Tensor], count: int) -> None:
        """Replace the sums by ``tensors`` (as :meth:`named_tensors` names them) over ``count`` examples."""
        for name, mine in self.named_tensors().items():
            if name not in tensors or tensors[name].shape != mine.shape:
                raise ValueError(f"saved curvature lacks {name!r} of shape {tuple(mine.shape)}")
            mine.copy_(tensors[name])
        self.count = count

    def merge(self, other: _Sums) -> None:
        """Add the sums of an accumulator of the same blocks and sums over another shard of the data."""
        mine, theirs = self.named_tensors(), other.named_tensors()
        if mine.keys() != theirs.keys():
            raise ValueError("cannot merge accumulators of different blocks or sums")
        for name, tensor in mine.items():
            tensor += theirs[name].to(tensor.device)
        self.count += other.count


class CurvatureAccumulator(_Sums):
    """Sums of per-sample gradient statistics for a fixed list of blocks."""

    def __init__(
        self,
        blocks: Sequence[Block],
        *,
        fim: bool = False,
        gfim: bool = True,
        dtype: torch.dtype = torch.float32,
        fim_max_params: int | None = None,
    ) -> None:
        self.blocks = list(blocks)
        if fim and fim_max_params is not None:
            check_fim_size(self.blocks, fim_max_params)
        self.count = 0
        # The d x d GFIM costs B r d^2 per batch (on a dense layer, far more than its forward):
        # it is summed only when a method inverts it. The squared norms (the damping) always are.
        self.gram: dict[str, torch.Tensor] | None = {} if gfim else None
        self.sq_norm: dict[str, torch.Tensor] = {}
        self.fim: dict[str, torch.Tensor] | None = {} if fim else None
        for block in self.blocks:
            r, d = block.shape
            device = block.device
            if self.gram is not None:
                self.gram[block.name] = torch.zeros(d, d, dtype=dtype, device=device)
            self.sq_norm[block.name] = torch.zeros((), dtype=dtype, device=device)
            if self.fim is not None:
                self.fim[block.name] = torch.zeros(r * d, r * d, dtype=dtype, device=device)

    def update(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Add one batch of per-sample gradients ``{name: [B, r, d]}``."""
        batch_size = None
        for block in self.blocks:
            g = grads[block.name].to(self.sq_norm[block.name])
            batch_size = g.shape[0]
            flat = g.reshape(batch_size, -1)
            if self.gram is not None:
                # sum_i g_i^T g_i: contract the batch and r axes together in one matmul.
                stacked = g.transpose(0, 1).reshape(-1, g.shape[-1])
                self.gram[block.name].addmm_(stacked.T, stacked)
            self.sq_norm[block.name] += flat.square().sum()
            if self.fim is not None:
                self.fim[block.name].addmm_(flat.T, flat)
        self.count += batch_size or 0

    def merge(self, other: _Sums) -> None:
        """Add the sums of an accumulator over another shard of the data."""
        assert isinstance(other, CurvatureAccumulator)
        if [b.name for b in other.blocks] != [b.name for b in self.blocks]:
            raise ValueError("cannot merge curvature accumulators over different blocks")
        if (self.fim is None) != (other.fim is None) or (self.gram is None) != (other.gram is None):
            raise ValueError("cannot merge an accumulator with the flattened FIM or the GFIM into one without it")
        super().merge(other)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every running sum by name (``gram/<block>``, ``sq_norm/<block>``, ``fim/<block>``), in a fixed order."""
        sums = {"gram": self.gram, "sq_norm": self.sq_norm, "fim": self.fim}
        return {
            f"{kind}/{b.name}": table[b.name] for kind, table in sums.items() if table is not None for b in self.blocks
        }

    def gfim(self, name: str) -> torch.Tensor:
        """``G_l = (1/n) sum_i g_i^T g_i``; only when accumulated with ``gfim=True``."""
        if self.gram is None:
            raise KeyError("the GFIM was not accumulated")
        return self.gram[name] / self.count

    def flat_fim(self, name: str) -> torch.Tensor:
        """``F_l = (1/n) sum_i vec(g_i) vec(g_i)^T``; only when accumulated with ``fim=True``."""
        if self.fim is None:
            raise KeyError("the flattened FIM was not accumulated")
        return self.fim[name] / self.count

    def spectrum(self, c: float, mode: DampingMode = "relative") -> list[dict[str, float | int | str]]:
        """Per block: the GFIM's smallest, mean and largest eigenvalue, the damping ``lambda``, and
        the condition number of ``G + lambda I`` (one float64 eigendecomposition per block).

        Float32 inverses lose accuracy beyond a condition number of ~1e5: this names the blocks.
        With the flattened FIM accumulated, ``kron_gap`` is ``||F - I_r (x) G / r||_F / ||F||_F``:
        how far the block is from the paper's Lemma 3.1 (i.i.d. zero-mean rows), 0 where it holds.
        """
        if self.gram is None:
            raise NotFittedError(
                "the spectrum is the GFIM's, and this fit did not accumulate it (no method that inverts it was "
                "asked for): call fit(train_loader, methods=['hyperinf'])."
            )
        rows = []
        for block in self.blocks:
            gfim = self.gfim(block.name).double()
            eigs = torch.linalg.eigvalsh(gfim).clamp_min(0.0)
            lam = self.damping(block, c, mode)
            row: dict[str, float | int | str] = {
                "block": block.name,
                "r": block.shape[0],
                "d": block.shape[1],
                "damping": lam,
                "eig_min": float(eigs[0]),
                "eig_mean": float(eigs.mean()),
                "eig_max": float(eigs[-1]),
                "condition": float((eigs[-1] + lam) / (eigs[0] + lam)) if lam > 0 or eigs[0] > 0 else float("inf"),
            }
            if self.fim is not None:
                fim = self.flat_fim(block.name).double()
                lemma = torch.block_diag(*[gfim / block.shape[0]] * block.shape[0])
                row["kron_gap"] = float(torch.linalg.matrix_norm(fim - lemma) / torch.linalg.matrix_norm(fim))
            rows.append(row)
        return rows

    def damping(self, block: Block, c: float, mode: DampingMode = "relative") -> float:
        """``lambda_l`` for block ``l``: ``c`` times a mean squared gradient entry, or ``c`` itself.

        ``"relative"`` (paper, Algorithm 2): ``c / (n p_l) sum_i ||g_i||_F^2`` with ``p_l = r d``,
        ``c`` times the mean eigenvalue of the flattened FIM. ``"gfim"``: ``c / (n d) sum_i
        ||g_i||_F^2``, ``c`` times the mean eigenvalue of the ``d x d`` GFIM (``r`` times larger),
        which bounds the GFIM's condition number by ``1 + d / c`` whatever ``r``: dense layers,
        with ``r`` in the hundreds, are otherwise too ill-conditioned for float32.

        A block whose gradient is zero for every training example (see :meth:`dead_blocks`) gets
        ``lambda = 1`` in the relative modes: its curvature ``I`` is then invertible by every
        method, and it adds nothing to any score since every ``g_k`` is zero there.
        """
        if mode == "absolute":
            return float(c)
        per = {"relative": block.num_params, "gfim": block.shape[1]}
        if mode not in per:
            raise ValueError(f"damping_mode must be 'relative', 'gfim' or 'absolute', got {mode!r}")
        if float(self.sq_norm[block.name]) == 0.0:  # a dead block (see dead_blocks)
            return 1.0
        return float(c * self.sq_norm[block.name] / (self.count * per[mode]))

    def warn_dead_blocks(self, stacklevel: int = 2) -> None:
        """Warn, naming them, about blocks that add nothing to any score (see :meth:`dead_blocks`)."""
        dead = self.dead_blocks()
        if dead:
            warnings.warn(
                f"block(s) {', '.join(dead)} have zero gradient on every training example, so they add nothing "
                "to any score (a fresh peft adapter's lora_A gets no gradient while lora_B is zero: train it first).",
                DeadBlockWarning,
                stacklevel=stacklevel + 1,
            )

    def dead_blocks(self) -> list[str]:
        """Blocks whose per-sample gradient was exactly zero for every example accumulated."""
        return [b.name for b in self.blocks if float(self.sq_norm[b.name]) == 0.0]


def check_fim_size(blocks: Sequence[Block], limit: int) -> None:
    """Refuse a flattened FIM (``rd x rd``) larger than ``limit`` rows, naming the block and the alternative."""
    too_big = [b for b in blocks if b.num_params > limit]
    if too_big:
        b = too_big[0]
        raise ConfigurationError(
            f"the flattened FIM of block {b.name!r} would be {b.num_params} x {b.num_params} "
            f"(limit fim_max_params={limit}); use 'hyperinf' (GFIM, {b.shape[1]} x {b.shape[1]}) or a smaller LoRA rank."
        )


class KroneckerAccumulator(_Sums):
    """K-FAC's pass 1: per block, sums over non-padding tokens of ``a a^T`` and ``delta delta^T``, and the token count.

    ``a`` is the layer input (a 1 appended when the block includes its bias), ``delta = dL_k/dy``
    the gradient of an example's loss with respect to the layer output. Memory is
    ``O(d_in^2 + d_out^2)`` per block whatever the number of examples or tokens.
    """

    def __init__(self, blocks: Sequence[Block], *, dtype: torch.dtype = torch.float32) -> None:
        self.blocks = list(blocks)
        self.count = 0
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            d_out, d_in = block.kind.matrix_shape(block.module)
            device = block.device
            size = d_in + int(block.has_bias)
            self.inputs[block.name] = torch.zeros(size, size, dtype=dtype, device=device)
            self.outputs[block.name] = torch.zeros(d_out, d_out, dtype=dtype, device=device)
            self.tokens[block.name] = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, factors: Mapping[str, TokenFactors], batch_size: int) -> None:
        """Add one batch's token factors (:attr:`hyperinf.gradients.BatchGradients.factors`) over ``batch_size`` examples."""
        for block in self.blocks:
            term = factors[block.name]
            self.inputs[block.name] += term.inputs.to(self.inputs[block.name])
            self.outputs[block.name] += term.outputs.to(self.outputs[block.name])
            self.tokens[block.name] += term.tokens
        self.count += batch_size

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every running sum by name (``kron_in/<block>``, ``kron_out/<block>``, ``kron_tokens/<block>``), in a fixed order."""
        sums = {"kron_in": self.inputs, "kron_out": self.outputs, "kron_tokens": self.tokens}
        return {f"{kind}/{b.name}": table[b.name] for kind, table in sums.items() for b in self.blocks}

    def factors(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised factors ``(R, D)`` in the block's ``r x d`` layout order, in float64.

        ``S = (1/n) sum_tokens delta delta^T`` per example and ``A = (1/N) sum_tokens a a^T`` per
        token (``N`` tokens in all), so ``S (x) A`` is ``T E_tok[delta delta^T] (x) E_tok[a a^T]``:
        the Fisher ``(1/n) sum_k vec(g_k) vec(g_k)^T`` of examples of ``T`` tokens when tokens are
        independent and alike, and that Fisher exactly for one example of one token.
        """
        tokens = max(int(self.tokens[block.name]), 1)
        inputs = self.inputs[block.name].double() / tokens
        outputs = self.outputs[block.name].double() / max(self.count, 1)
        return block.kronecker_order(inputs, outputs)
