"""The settings of an influence run, split by what they shape: the fit, the damping, each method's inverse, the run.

:class:`FitConfig` shapes pass 1's sums: it is saved with a fit and keys its checkpoint, so a
fit or checkpoint made under other values is refused. :class:`ScoreConfig` (the damping) shapes
every preconditioner built from a fit; :class:`SchulzOptions` and :class:`LissaOptions` belong to
the methods that read them; :class:`RuntimeConfig` changes where and how the work runs, never a
score. Every part checks its values when it is built, before any data is read.
:meth:`InfluenceConfig.from_options` builds all of them from the engine's flat keyword options.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from hyperinf.blocks import Side
from hyperinf.curvature import DampingMode
from hyperinf.errors import ConfigurationError
from hyperinf.linalg import OnFail
from hyperinf.spill import SpillDtype

Pass2 = Literal["gradients", "jvp"]  # how pass 2 reads the training set (see hyperinf.pass2)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _one_of(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {choices}, got {value!r}: pick one of them")


@dataclass(frozen=True)
class FitConfig:
    """What shapes pass 1's sums: saved with a fit, part of its checkpoint's key.

    side: which side of a dense block's gradient the GFIM is formed on (``"in"``: ``d = d_in``).
    include_bias: a dense block's bias is one more input column.
    dtype: precision of gradients, curvature and inverses (``"float32"`` or ``"float64"``).
    """

    side: Side = "in"
    include_bias: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _one_of("dtype", self.dtype, tuple(_DTYPES))
        _one_of("side", self.side, get_args(Side))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class ScoreConfig:
    """The damping every method shares, ``A_l = G_l + lambda_l I``.

    damping: ``c`` in ``lambda_l = c / (n p_l) sum_i ||g_i||^2`` (``damping_mode="relative"``,
        ``p_l = r d``), in ``c / (n d) sum_i ||g_i||^2`` (``"gfim"``: ``c`` times the GFIM's mean
        eigenvalue, for blocks with many rows) or ``lambda_l`` itself for every block (``"absolute"``).
    """

    damping: float = 0.1
    damping_mode: DampingMode = "relative"

    def __post_init__(self) -> None:
        if self.damping < 0:
            raise ConfigurationError(
                f"damping must be >= 0, got {self.damping}: pass 0 (undamped) or a positive factor (the default is 0.1)"
            )
        _one_of("damping_mode", self.damping_mode, get_args(DampingMode))


@dataclass(frozen=True)
class SchulzOptions:
    """Schulz's (hyperpower) iteration, for ``hyperinf`` and ``hyperinf-fim`` (engine options ``schulz_*``).

    init: ``"auto"`` (``X_0`` from a bound on the spectrum: converges for any SPD matrix) or the
        paper's fixed ``X_0 = c I``.
    on_nonconvergence: what a block that misses its tolerance does: ``"warn"``, ``"raise"`` or
        ``"cholesky"`` (linalg's ``"ignore"`` is refused: a failed block would then change the
        scores without a trace). Engine option ``on_nonconvergence``.
    """

    max_iter: int = 100
    tol: float | None = None
    init: str | float = "auto"
    order: int = 2
    on_nonconvergence: OnFail = field(default="warn", metadata={"option": "on_nonconvergence"})

    def __post_init__(self) -> None:
        if self.max_iter < 0:
            raise ConfigurationError(
                f"schulz_max_iter must be >= 0, got {self.max_iter}: pass an iteration cap (the default is 100)"
            )
        if self.order < 2:
            raise ConfigurationError(
                f"schulz_order must be >= 2, got {self.order}: pass 2 (Schulz's iteration, the default) or a higher order"
            )
        fixed = isinstance(self.init, (int, float)) and not isinstance(self.init, bool) and self.init > 0
        if self.init != "auto" and not fixed:
            raise ConfigurationError(
                f"schulz_init must be 'auto' or a positive float c (the start X_0 = c I), got {self.init!r}: "
                "pass 'auto' (the default) or a c > 0"
            )
        _one_of("on_nonconvergence", self.on_nonconvergence, ("warn", "raise", "cholesky"))


@dataclass(frozen=True)
class LissaOptions:
    """LiSSA's Neumann series ``(1/s) sum_{j<J} (I - A/s)^j v`` (engine options ``lissa_*``).

    iters: ``J``, the number of terms.
    scale: ``s``; ``None`` uses a bound on ``lambda_max(A)``; a scale at or below ``lambda_max / 2``
        (where the series diverges) is refused when the preconditioner is built.
    """

    iters: int = 10
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ConfigurationError(
                f"lissa_iters must be >= 1, got {self.iters}: pass the number of Neumann terms (the default is 10)"
            )
        if self.scale is not None and not self.scale > 0:
            raise ConfigurationError(
                f"lissa_scale must be positive, got {self.scale!r}: pass a scale above lambda_max / 2 of every block, "
                "or None (the default) for a bound on lambda_max"
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the work runs; no score depends on these.

    fim_max_params, hessian_max_params: the largest flattened FIM / exact Hessian (rows) pass 1 may form.
    cache_bytes: per-sample training gradients up to this size are kept in memory from ``fit`` for pass 2.
    spill: past ``cache_bytes``, write the gradients to a file in a new folder under ``spill_dir``
        (``None``: the system's temporary directory) and read them back memory-mapped, deleted with
        the fit (:mod:`hyperinf.spill`). ``False``: pass 2 recomputes them.
    spill_dtype: ``"full"`` (the gradients' dtype, read back bit-identical) or ``"bfloat16"`` (half of float32's size).
    pass2: how scoring passes over the training set: ``"gradients"`` (per-sample gradients, from
        the cache or recomputed) or ``"jvp"`` (forward-mode directional derivatives, no per-example
        gradient: :mod:`hyperinf.pass2`; not with self-influence).
    distributed: every process passes its own shard of the data (:func:`hyperinf.distributed.shard`);
        the engine's sums over data are all-reduced, and scores cover the process's own shard.
    """

    fim_max_params: int = 4096
    hessian_max_params: int = 4096
    cache_bytes: int = 1 << 30
    spill: bool = True
    spill_dir: str | None = None
    spill_dtype: SpillDtype = "full"
    pass2: Pass2 = "gradients"
    distributed: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _one_of("pass2", self.pass2, get_args(Pass2))
        _one_of("spill_dtype", self.spill_dtype, get_args(SpillDtype))
        if self.spill_dir is not None:  # a Path is accepted; kept as text so the settings save as JSON
            object.__setattr__(self, "spill_dir", str(self.spill_dir))

    @property
    def spill_folder(self) -> str | None:
        """Where gradients past ``cache_bytes`` go, or ``None`` when they are recomputed."""
        return (self.spill_dir or tempfile.gettempdir()) if self.spill else None


# The parts of InfluenceConfig and the prefix of their fields among the engine's flat option names.
_PARTS: dict[str, tuple[type, str]] = {
    "fit": (FitConfig, ""),
    "score": (ScoreConfig, ""),
    "schulz": (SchulzOptions, "schulz_"),
    "lissa": (LissaOptions, "lissa_"),
    "runtime": (RuntimeConfig, ""),
}


@dataclass(frozen=True)
class InfluenceConfig:
    """Every option of :class:`hyperinf.InfluenceEngine`, by part (defaults follow the paper)."""

    fit: FitConfig = field(default_factory=FitConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    schulz: SchulzOptions = field(default_factory=SchulzOptions)
    lissa: LissaOptions = field(default_factory=LissaOptions)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_options(cls, **options: Any) -> InfluenceConfig:
        """The config of the engine's flat keyword options (``damping=``, ``schulz_max_iter=``, ``dtype=``, ...)."""
        names = option_names()
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(names))}")
        values: dict[str, dict[str, Any]] = {part: {} for part in _PARTS}
        for option, value in options.items():
            part, name = names[option]
            values[part][name] = value
        return cls(**{part: kind(**values[part]) for part, (kind, _) in _PARTS.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)


def option_names() -> dict[str, tuple[str, str]]:
    """Each flat engine option -> (the part of :class:`InfluenceConfig` that holds it, its field name there)."""
    return {
        f.metadata.get("option", prefix + f.name): (part, f.name)
        for part, (kind, prefix) in _PARTS.items()
        for f in fields(kind)
    }
