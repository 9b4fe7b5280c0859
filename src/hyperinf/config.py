"""The settings of an influence run, kept in one dataclass so they can be saved next to results."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

from hyperinf.blocks import Side
from hyperinf.curvature import DampingMode
from hyperinf.linalg import OnFail
from hyperinf.spill import SpillDtype

Pass2 = Literal["gradients", "jvp"]  # how pass 2 reads the training set (see hyperinf.forward)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class InfluenceConfig:
    """Every option of :class:`hyperinf.InfluenceEngine` (defaults follow the paper and DESIGN.md).

    damping: ``c`` in ``lambda_l = c / (n p_l) sum_i ||g_i||^2`` (``damping_mode="relative"``,
        ``p_l = r d``), in ``c / (n d) sum_i ||g_i||^2`` (``"gfim"``: ``c`` times the GFIM's mean
        eigenvalue, for blocks with many rows) or ``lambda_l`` itself for every block (``"absolute"``).
    schulz_init: ``"auto"`` (converges for any SPD matrix) or the paper's fixed ``X_0 = c I``.
    on_nonconvergence: what an iterative inverse that misses its tolerance does: ``"warn"``,
        ``"raise"`` or ``"cholesky"`` (linalg's ``"ignore"`` is refused: a failed block would
        then change the scores without a trace).
    lissa_iters: ``J``, the number of terms of LiSSA's Neumann series ``(1/s) sum_{j<J} (I - A/s)^j v``.
    lissa_scale: ``s`` in that series; ``None`` uses a bound on ``lambda_max(A)``; a scale at or below
        ``lambda_max / 2`` (where the series diverges) is refused when the preconditioner is built.
    cache_bytes: per-sample training gradients up to this size are kept in memory from ``fit`` for pass 2.
    spill: past ``cache_bytes``, write the gradients to a file in a new folder under ``spill_dir``
        (``None``: the system's temporary directory) and read them back memory-mapped, deleted with
        the fit; measured 24x (MiniLM) and 10x (SmolLM2) faster than recomputing them (:mod:`hyperinf.spill`).
        ``False``: pass 2 recomputes them.
    spill_dtype: ``"full"`` (the gradients' dtype, read back bit-identical) or ``"bfloat16"`` (half of float32's size).
    pass2: how scoring passes over the training set: ``"gradients"`` (per-sample gradients, from
        the cache or recomputed) or ``"jvp"`` (forward-mode directional derivatives, no per-example
        gradient: :mod:`hyperinf.forward`; not with self-influence).
    distributed: every process passes its own shard of the data (:func:`hyperinf.distributed.shard`);
        the engine's sums over data are all-reduced, and scores cover the process's own shard.
    """

    side: Side = "in"
    include_bias: bool = True
    damping: float = 0.1
    damping_mode: DampingMode = "relative"
    schulz_max_iter: int = 100
    schulz_tol: float | None = None
    schulz_init: str | float = "auto"
    schulz_order: int = 2
    on_nonconvergence: OnFail = "warn"
    lissa_iters: int = 10
    lissa_scale: float | None = None
    fim_max_params: int = 4096
    hessian_max_params: int = 4096
    cache_bytes: int = 1 << 30
    spill: bool = True
    spill_dir: str | None = None
    spill_dtype: SpillDtype = "full"
    pass2: Pass2 = "gradients"
    dtype: str = "float32"
    distributed: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.damping_mode not in get_args(DampingMode):
            raise ValueError(f"damping_mode must be one of {get_args(DampingMode)}, got {self.damping_mode!r}")
        if self.on_nonconvergence not in ("warn", "raise", "cholesky"):
            raise ValueError(f"on_nonconvergence must be 'warn', 'raise' or 'cholesky', got {self.on_nonconvergence!r}")
        if self.schulz_init != "auto" and not (
            isinstance(self.schulz_init, (int, float))
            and not isinstance(self.schulz_init, bool)
            and self.schulz_init > 0
        ):
            raise ValueError(
                f"schulz_init must be 'auto' or a positive float c (the start X_0 = c I), got {self.schulz_init!r}"
            )
        if self.lissa_scale is not None and not self.lissa_scale > 0:
            raise ValueError(
                f"lissa_scale must be positive (above lambda_max / 2 of every block) or None for a bound on "
                f"lambda_max, got {self.lissa_scale!r}"
            )
        if self.pass2 not in get_args(Pass2):
            raise ValueError(f"pass2 must be one of {get_args(Pass2)}, got {self.pass2!r}")
        if self.spill_dtype not in get_args(SpillDtype):
            raise ValueError(f"spill_dtype must be one of {get_args(SpillDtype)}, got {self.spill_dtype!r}")
        if self.spill_dir is not None:
            self.spill_dir = str(self.spill_dir)  # a Path is accepted; kept as text so the settings save as JSON
        if self.schulz_order < 2:
            raise ValueError(f"schulz_order must be >= 2 (2 is Schulz's iteration), got {self.schulz_order}")
        if self.schulz_max_iter < 0:
            raise ValueError(f"schulz_max_iter must be >= 0, got {self.schulz_max_iter}")
        if self.lissa_iters < 1:
            raise ValueError(f"lissa_iters must be >= 1, got {self.lissa_iters}")

    @property
    def spill_folder(self) -> str | None:
        """Where gradients past ``cache_bytes`` go, or ``None`` when they are recomputed."""
        return (self.spill_dir or tempfile.gettempdir()) if self.spill else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def layout(self) -> dict[str, Any]:
        """The options that shape the accumulated curvature (a saved fit or checkpoint is valid only for them)."""
        return {"side": self.side, "include_bias": self.include_bias, "dtype": self.dtype}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
