"""The fitted curvature: pass 1's sums over the training data, the preconditioners built from them, save and load.

A fit is saved as a folder — ``curvature.safetensors`` (the per-block GFIM sums, squared norms,
and the flattened FIM / exact Hessian / exact GGN / Kronecker factors when accumulated) and ``fit.json`` (example count, layout
options, and a fingerprint of every selected block: name, shape, side and a SHA-256 of its
weights) — and loaded to score new queries without pass 1. Damping and inverse options are not
part of the fit: they apply when a preconditioner is built, so a loaded fit can be re-damped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hyperinf.blocks import Block, check_fingerprint, fingerprint
from hyperinf.checkpoints import PassCheckpoint
from hyperinf.config import InfluenceConfig
from hyperinf.curvature import CurvatureAccumulator, KroneckerAccumulator
from hyperinf.errors import (
    EmptyDataError,
    FitMismatchError,
    NotFittedError,
)
from hyperinf.gradients import BatchGradients, PerSampleGradients
from hyperinf.hessian import GGNAccumulator, HessianAccumulator, OutputFunctions, require_outputs
from hyperinf.methods import CURVATURE_KINDS, FittedInputs, Method, build_preconditioner, get_method
from hyperinf.preconditioners import (
    BlockDiagnostics,
    GradientSource,
    Preconditioner,
    Reduce,
)
from hyperinf.results import atomic_write, write_json

FORMAT = 2
_TENSORS, _META = "curvature.safetensors", "fit.json"


class FittedCurvature:
    """Curvature sums of the selected blocks (exact Hessian, exact GGN, Kronecker factors), and the preconditioners built from them."""

    def __init__(
        self,
        curvature: CurvatureAccumulator,
        hessian: torch.Tensor | None = None,
        kronecker: KroneckerAccumulator | None = None,
        ggn: torch.Tensor | None = None,
    ) -> None:
        self.curvature = curvature
        self.hessian = hessian
        self.kronecker = kronecker
        self.ggn = ggn
        self._built: dict[str, Preconditioner] = {}
        self._unreported_seconds: dict[str, float] = {}

    @classmethod
    def accumulate(
        cls,
        batches: Iterable[tuple[Any, BatchGradients]],
        methods: Sequence[Method],
        config: InfluenceConfig,
        gradients: PerSampleGradients,
        reduce: Reduce,
        checkpoint: PassCheckpoint | None = None,
        resumed: tuple[int, Mapping[str, torch.Tensor]] = (0, {}),
        outputs: OutputFunctions | None = None,
    ) -> FittedCurvature:
        """Pass 1: sum what every method in ``methods`` needs over ``batches`` (and over processes with ``reduce``).

        ``batches`` must be a lazy stream of ``gradients``' batches: the Kronecker factors are captured while it is read.
        With a ``checkpoint``, the partial sums are written every few batches; ``resumed`` is an
        earlier run's ``(batches done, sums)``, and ``batches`` then starts after those batches.
        ``outputs`` (the model's outputs and the loss of them) is needed by the exact GGN only.
        """
        curvature = CurvatureAccumulator(
            gradients.blocks,
            fim=any(m.fim for m in methods),
            gfim=any(m.gfim for m in methods),
            dtype=config.fit.torch_dtype,
            fim_max_params=config.runtime.fim_max_params,
        )
        hessian = None
        if any(m.hessian for m in methods):
            hessian = HessianAccumulator(
                gradients.blocks, max_params=config.runtime.hessian_max_params, dtype=config.fit.torch_dtype
            )
        ggn = None
        if any(m.ggn for m in methods):
            ggn = GGNAccumulator(
                gradients.blocks,
                require_outputs(outputs),
                padding=gradients.padding,
                max_params=config.runtime.hessian_max_params,
                dtype=config.fit.torch_dtype,
            )
        kronecker = (
            KroneckerAccumulator(gradients.blocks, dtype=config.fit.torch_dtype)
            if any(m.kronecker for m in methods)
            else None
        )
        every = {"curvature": curvature, "hessian": hessian, "ggn": ggn, "kronecker": kronecker}
        sums = {key: acc for key, acc in every.items() if acc is not None}
        done, state = resumed
        if state:
            _restore(sums, state)
        with gradients.capturing_factors(kronecker is not None):  # ``batches`` is computed lazily, inside this block
            for batch, grads in batches:
                curvature.update(grads.grads)
                if hessian is not None:
                    hessian.update(gradients.model, gradients.loss_fn, batch)
                if ggn is not None:
                    ggn.update(gradients.model, batch)
                if kronecker is not None:
                    if grads.factors is None:
                        raise ValueError(
                            "batches were computed before accumulate: pass the lazy stream of fit's batches"
                        )
                    kronecker.update(grads.factors, grads.batch_size)
                done += 1
                if checkpoint is not None:
                    checkpoint.save(done, lambda: _partial(sums))
        for accumulator in sums.values():
            accumulator.count = reduce(accumulator.tensors(), accumulator.count)
        if curvature.count == 0:
            raise EmptyDataError("train_loader yielded no examples: fit needs at least one training example.")
        curvature.warn_dead_blocks(stacklevel=3)
        if checkpoint is not None:
            checkpoint.finish()
        return cls(
            curvature,
            hessian.matrix() if hessian is not None else None,
            kronecker,
            ggn.matrix() if ggn is not None else None,
        )

    @property
    def count(self) -> int:
        return self.curvature.count

    def require(self, name: str) -> None:
        """Raise a clear error when method ``name`` needs curvature this fit did not accumulate."""
        held = self.held()
        for kind in get_method(name).needs():
            if not held[kind]:
                raise NotFittedError(
                    f"method {name!r} needs {CURVATURE_KINDS[kind]}: call fit(train_loader, methods=[{name!r}])."
                )

    def held(self) -> dict[str, bool]:
        """Which of pass 1's sums (:data:`hyperinf.methods.CURVATURE_KINDS`) this fit accumulated."""
        return {
            "gfim": self.curvature.gram is not None,
            "fim": self.curvature.fim is not None,
            "hessian": self.hessian is not None,
            "ggn": self.ggn is not None,
            "kronecker": self.kronecker is not None,
        }

    def preconditioner(
        self, name: str, config: InfluenceConfig, train_gradients: GradientSource | None, reduce: Reduce | None
    ) -> Preconditioner:
        """Method ``name``'s preconditioner, built on first use and then reused."""
        self.require(name)
        if name not in self._built:
            start = time.perf_counter()
            inputs = FittedInputs(
                self.curvature, config, self.hessian, train_gradients, reduce, self.kronecker, self.ggn
            )
            self._built[name] = build_preconditioner(name, inputs)
            self._unreported_seconds[name] = time.perf_counter() - start
        return self._built[name]

    def take_build_seconds(self, name: str) -> float:
        """Seconds spent building ``name``'s preconditioner not yet counted in a reported time (0 after the first call)."""
        return self._unreported_seconds.pop(name, 0.0)

    def diagnostics(self) -> list[BlockDiagnostics]:
        """Per-block damping and iterative-inverse outcome of every preconditioner built so far."""
        return [d for pre in self._built.values() for d in pre.diagnostics]

    def save(self, directory: str | Path, config: InfluenceConfig) -> Path:
        """Write the fit into ``directory`` (``fit.json`` last, so a folder without it is an unfinished save)."""
        directory = Path(directory)
        sums = {
            **self.curvature.named_tensors(),
            **(self.kronecker.named_tensors() if self.kronecker is not None else {}),
        }
        tensors = {name: t.detach().cpu().contiguous() for name, t in sums.items()}
        for name, matrix in (("hessian", self.hessian), ("ggn", self.ggn)):
            if matrix is not None:
                tensors[name] = matrix.detach().cpu().contiguous()
        (directory / _META).unlink(missing_ok=True)
        atomic_write(directory / _TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "format": FORMAT,
            "count": self.count,
            **self.held(),
            "fit": asdict(config.fit),
            "blocks": fingerprint(self.curvature.blocks),
        }
        write_json(directory / _META, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, blocks: Sequence[Block], config: InfluenceConfig) -> FittedCurvature:
        """Read a fit saved by :meth:`save`, after checking it was computed on these blocks and weights."""
        directory = Path(directory)
        if not (directory / _META).is_file() or not (directory / _TENSORS).is_file():
            raise FitMismatchError(
                f"{directory} holds no saved fit ({_META} and {_TENSORS}): write one with engine.save_fit(directory)."
            )
        meta = json.loads((directory / _META).read_text())
        if meta.get("format") != FORMAT:
            raise FitMismatchError(
                f"{directory}/{_META} has format {meta.get('format')!r}; this hyperinf reads format {FORMAT}: fit again and save_fit with this version."
            )
        _check_fit_config(meta["fit"], asdict(config.fit), directory)
        check_fingerprint(meta["blocks"], fingerprint(blocks), f"the fit in {directory}", "fit again")
        curvature = CurvatureAccumulator(blocks, fim=meta["fim"], gfim=meta["gfim"], dtype=config.fit.torch_dtype)
        tensors = load_file(str(directory / _TENSORS))
        curvature.load(tensors, meta["count"])
        device = blocks[0].device
        hessian = tensors["hessian"].to(device) if meta["hessian"] else None
        ggn = (
            tensors["ggn"].to(device) if meta.get("ggn", False) else None
        )  # fits saved before the GGN have no such key
        kronecker = None
        if meta.get("kronecker", False):  # fits saved before K-FAC have no such key
            kronecker = KroneckerAccumulator(blocks, dtype=config.fit.torch_dtype)
            kronecker.load(tensors, meta["count"])
        return cls(curvature, hessian, kronecker, ggn)


def _check_fit_config(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    differ = [
        f"{key}={saved[key]!r} (this engine: {current[key]!r})" for key in saved if saved[key] != current.get(key)
    ]
    if differ:
        raise FitMismatchError(
            f"the fit in {directory} was computed with {', '.join(differ)}: construct the engine with the fit's options."
        )


def _partial(sums: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every accumulator's running sums and example count, named for a checkpoint."""
    state = {f"{key}/{name}": t for key, acc in sums.items() for name, t in acc.named_tensors().items()}
    return state | {f"count/{key}": torch.tensor(acc.count) for key, acc in sums.items()}


def _restore(sums: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Load a checkpoint's :func:`_partial` state into the accumulators."""
    for key, acc in sums.items():
        prefix = f"{key}/"
        acc.load({n[len(prefix) :]: t for n, t in state.items() if n.startswith(prefix)}, int(state[f"count/{key}"]))
