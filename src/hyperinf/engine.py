"""The public object: ``fit`` (pass 1, curvature) then ``score`` / ``self_influence`` / ``pairwise`` / ``top_k`` (pass 2).

Scores follow DESIGN.md: ``score_k = - sum_l <h_l, g_{k,l}>`` with ``h_l ~ A_l^{-1} v_l``;
positive scores are harmful (up-weighting the example raises the validation loss), negative
scores helpful. The parts live in their own modules: the training-gradient source
(:mod:`hyperinf.sources`), the fitted curvature (:mod:`hyperinf.fitted`), the methods
(:mod:`hyperinf.methods`) and pass 2 (:mod:`hyperinf.pass2`, its arithmetic in :mod:`hyperinf.scoring`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from hyperinf import distributed, scoring
from hyperinf.blocks import BlockSpec, select_blocks
from hyperinf.checkpoints import fit_checkpoint, score_checkpoint
from hyperinf.config import InfluenceConfig
from hyperinf.curvature import check_fim_size
from hyperinf.errors import ConfigurationError, NotFittedError
from hyperinf.fitted import FittedCurvature
from hyperinf.gradients import BatchGradients, Factors, LossFn, PerSampleGradients, project_matrix
from hyperinf.hessian import (
    GGNAccumulator,
    HessianAccumulator,
    OutputFn,
    OutputLossFn,
    check_exact_size,
    require_outputs,
)
from hyperinf.methods import Method, get_method
from hyperinf.pass2 import DirectionalDerivatives, TrainingPass, TrainingPasses
from hyperinf.preconditioners import BlockDiagnostics, Preconditioner, Vectors
from hyperinf.results import save_results
from hyperinf.scoring import RunningTopK, TopK
from hyperinf.sources import GradientPlan, GradientStream, TrainingGradients, check_order, mean_gradient
from hyperinf.task import Task, as_task


class InfluenceEngine:
    """Influence of training examples on a validation set, for any PyTorch model.

    ``task`` is a :class:`hyperinf.task.Task` (training loss, measurement, padding mask, outputs) or
    a plain ``loss_fn(model, batch)`` returning per-example losses ``[B]``. ``blocks`` is ``"lora"``,
    ``"linear"`` or a list of module names; ``method`` one of :func:`hyperinf.methods.method_names`.
    With a plain ``loss_fn``, ``output_fn(model, batch) -> [B, K]`` and ``output_loss(outputs, batch) -> [B]``
    split it into the model's outputs and the loss of them (e.g. the logits, and
    ``F.cross_entropy(logits, labels, reduction="none")``): only ``exact-ggn``'s fit needs them.
    Other keyword options are those of :meth:`hyperinf.config.InfluenceConfig.from_options`.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | LossFn,
        *,
        blocks: BlockSpec = "lora",
        method: str = "hyperinf",
        output_fn: OutputFn | None = None,
        output_loss: OutputLossFn | None = None,
        **options: Any,
    ) -> None:
        self.config = InfluenceConfig.from_options(**options)
        self._check_method(method)
        self.task = as_task(task, output_fn, output_loss)
        self.outputs = self.task.output_functions()
        if self.config.runtime.distributed:
            distributed.require_initialized()
        self.model, self.method, self.block_spec = model, method, blocks
        self.blocks = select_blocks(model, blocks, side=self.config.fit.side, include_bias=self.config.fit.include_bias)
        dtype, padding = self.config.fit.torch_dtype, self.task.padding_mask
        self.gradients = PerSampleGradients(model, self.task.loss, self.blocks, dtype=dtype, padding=padding)
        measured = PerSampleGradients(model, self.task.measurement, self.blocks, dtype=dtype, padding=padding)
        self.device = next(model.parameters()).device  # where batches go: the model's input side
        self._reduce = distributed.reducer(self.config.runtime.distributed)
        self._stream = GradientStream(self.gradients, self.device, progress=self.config.runtime.progress)
        self._measured = GradientStream(measured, self.device, progress=self.config.runtime.progress)
        self._train = TrainingGradients(
            self._stream,
            self.config.runtime.cache_bytes,
            self.config.runtime.spill_folder,
            self.config.runtime.spill_dtype,
        )
        self._pass2 = TrainingPasses(
            self._train, DirectionalDerivatives(model, self.task.loss, self.blocks), self.config.runtime.pass2
        )
        self._fit: FittedCurvature | None = None
        self._results: dict[str, torch.Tensor] = {}
        self.ihvp_seconds: dict[str, float] = {}

    def fit(
        self,
        train_loader: Iterable[Any],
        *,
        methods: Sequence[str] = (),
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 50,
    ) -> InfluenceEngine:
        """Accumulate the curvature every method in ``{method} | methods`` needs, in one pass; ``checkpoint``
        (a file) makes it resumable after a crash, with the same result (:mod:`hyperinf.checkpoints`)."""
        wanted = [self.check_supports(m) for m in dict.fromkeys([self.method, *methods])]
        saver = (
            fit_checkpoint(checkpoint, checkpoint_every, self.blocks, self.config, wanted, train_loader)
            if checkpoint
            else None
        )
        resumed = saver.resume("fit") if saver is not None else (0, {})
        batches = self._train.record(train_loader, allow_empty=True, skip=resumed[0])
        self._fit = FittedCurvature.accumulate(
            batches, wanted, self.config, self.gradients, self._reduce, saver, resumed, self.outputs
        )
        return self

    def save_fit(self, directory: str | Path) -> Path:
        """Save the fitted curvature (see :mod:`hyperinf.fitted`) to score new queries later without pass 1."""
        return self.fitted.save(directory, self.config)

    def load_fit(self, directory: str | Path, *, train_loader: Iterable[Any] | None = None) -> InfluenceEngine:
        """Load a fit saved by :meth:`save_fit` for this model's blocks and weights (a clear error otherwise).

        ``train_loader`` is the fit's training data, needed only by methods that sum over it (DataInf).
        """
        fit = FittedCurvature.load(directory, self.blocks, self.config)
        fit.require(self.method)
        self._fit = fit
        self._train.forget(train_loader)
        return self

    def score(
        self, train_loader: Iterable[Any], val_loader: Iterable[Any], *, method: str | None = None
    ) -> torch.Tensor:
        """Influence of each training example on the mean validation loss, ``[n_train]``."""
        method = method or self.method
        return self.score_methods(train_loader, val_loader, [method])[method]

    def score_methods(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        methods: Sequence[str],
        *,
        self_influence: str | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 50,
    ) -> TrainingPass:
        """:meth:`score` for several methods with one validation pass and one training pass.

        The same training pass keeps each example's training loss and, with ``self_influence=method``,
        its self-influence (a second pass would cost as much as the first where gradients are recomputed).
        The time each method took to turn ``v`` into ``h`` (its first build included) is kept in
        :attr:`ihvp_seconds`, and each method's ``h`` in the result's ``directions``. ``checkpoint`` makes the
        training pass resumable, as for :meth:`fit`.
        """
        own = self._per_example_preconditioner(self_influence) if self_influence else None
        v = self.mean_gradient(val_loader, "val_loader")
        directions = [self._precondition(m, {name: g.unsqueeze(0) for name, g in v.items()}) for m in methods]
        stacked = {name: torch.cat([h[name] for h in directions]) for name in directions[0]}
        saver = (
            score_checkpoint(
                checkpoint, checkpoint_every, self.blocks, self.config, stacked, methods, self_influence, train_loader
            )
            if checkpoint
            else None
        )
        result = self._pass2.scores(train_loader, stacked, methods, own=own, saver=saver)
        result.directions = dict(zip(methods, directions))
        self._keep({f"score/{m}": s for m, s in result.scores.items()} | {"train_loss": result.train_loss})
        if result.self_influence is not None:
            self._keep({f"self_influence/{self_influence}": result.self_influence})
        return result

    def self_influence(
        self,
        train_loader: Iterable[Any],
        *,
        method: str | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 50,
    ) -> torch.Tensor:
        """``- sum_l <A_l^{-1} g_k, g_k>`` per training example (<= 0; most negative = most unusual);
        ``checkpoint`` makes the pass resumable, as for :meth:`fit`."""
        method = method or self.method
        pre = self._per_example_preconditioner(method)
        saver = None
        if checkpoint:  # the preconditioner applied to a fixed vector stands for its curvature and damping
            probe = pre.apply(
                {
                    b.name: torch.ones(1, *b.shape, dtype=self.config.fit.torch_dtype, device=b.device)
                    for b in self.blocks
                }
            )
            saver = score_checkpoint(
                checkpoint, checkpoint_every, self.blocks, self.config, probe, [], method, train_loader
            )
        result = self._pass2.self_influence(train_loader, pre, saver)
        self._keep({f"self_influence/{method}": result})
        return result

    def pairwise(
        self,
        train_loader: Iterable[Any],
        query_loader: Iterable[Any],
        *,
        method: str | None = None,
        query_chunk: int = 256,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 50,
    ) -> torch.Tensor:
        """Influence of each training example on each query's loss, ``[n_train, n_query]``.

        Queries are preconditioned ``query_chunk`` rows at a time, so memory holds one chunk of query
        gradients next to one batch of training gradients (and the ``n_train x n_query`` result).
        ``checkpoint`` makes it resumable: each chunk's training pass is checkpointed at
        ``<checkpoint>.chunk<i>`` and kept whole once done, until every chunk is.
        """
        method = method or self.method
        columns, savers = [], []
        for i, h in enumerate(self._query_directions(query_loader, method, query_chunk)):
            names = [f"query{j}" for j in range(next(iter(h.values())).shape[0])]
            saver = (
                score_checkpoint(
                    f"{checkpoint}.chunk{i}", checkpoint_every, self.blocks, self.config, h, names, None, train_loader
                )
                if checkpoint
                else None
            )
            scored = self._pass2.scores(
                train_loader, h, names, saver=saver, what=f"pairwise, query chunk {i}", keep=True
            )
            columns.append(torch.stack([scored[name] for name in names], dim=1))
            savers.append(saver)
        for saver in filter(None, savers):
            saver.finish()
        result = torch.cat(columns, dim=1)
        self._keep({f"pairwise/{method}": result})
        return result

    def top_k(
        self,
        train_loader: Iterable[Any],
        query_loader: Iterable[Any],
        *,
        k: int = 10,
        method: str | None = None,
        query_chunk: int = 256,
    ) -> TopK:
        """Per query, the ``k`` most helpful and ``k`` most harmful training examples, streamed: no ``n x m`` matrix."""
        method = method or self.method
        parts = []
        for h in self._query_directions(query_loader, method, query_chunk):
            running = RunningTopK(k)
            for _, scores, _ in self._pass2.batches(train_loader, h):
                running.update(scores)
            parts.append(running.result())
        return TopK.cat(parts)

    def per_example_gradients(
        self,
        loader: Iterable[Any],
        *,
        queries: bool = False,
        skip: int = 0,
        project: Mapping[str, Factors] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Per batch after the first ``skip``, every example's gradient ``{block: [B, r, d]}``: of the training loss
        (pass 1's kept gradients when ``loader`` is the fit's), or with ``queries`` of the task's measurement.
        No fit is needed. With ``project`` (block -> ``(R, D)``), each block's ``R g D^T`` ``[B, k_r, k_d]``
        instead, formed from the projected inputs and output gradients when computed here: what a gradient
        index stores and queries with."""
        if project is not None and (queries or not self._train.holds(loader)):
            for batch in self.projected_gradients(loader, project, queries=queries, skip=skip):
                yield batch.grads
            return
        if queries:
            batches: Iterable[BatchGradients] = (
                grads for _, grads in self._measured(loader, "query_loader", skip=skip)
            )
        else:
            batches = self._train(loader, skip=skip)
        for grads in batches:
            yield grads.grads if project is None else {n: project_matrix(g, project[n]) for n, g in grads.grads.items()}

    def projected_gradients(
        self,
        loader: Iterable[Any],
        project: Mapping[str, Factors],
        *,
        queries: bool = False,
        skip: int = 0,
        kronecker: bool = False,
    ) -> Iterator[BatchGradients]:
        """Per batch after the first ``skip``, each block's projected gradient ``R g D^T`` ``[B, k_r, k_d]`` formed
        from the projected inputs and output gradients (of the loss, or with ``queries`` of the measurement), always
        computed here; with ``kronecker``, also the projected blocks' token factors (K-FAC of the projected model)."""
        if not queries:
            check_order(loader, "train_loader")
        loss = self.task.measurement if queries else self.task.loss
        dtype, padding = self.config.fit.torch_dtype, self.task.padding_mask

        def placed(m: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
            return None if m is None else m.to(device=device, dtype=dtype)

        on_device = {  # each block's projection matrices where its gradients are formed, converted once
            b.name: (placed(project[b.name][0], b.device), placed(project[b.name][1], b.device)) for b in self.blocks
        }
        gradients = PerSampleGradients(
            self.model, loss, self.blocks, dtype=dtype, padding=padding, project=on_device, kronecker=kronecker
        )
        stream = GradientStream(gradients, self.device, progress=self.config.runtime.progress)
        for _, grads in stream(loader, "query_loader" if queries else "train_loader", skip=skip):
            yield grads

    def preconditioner(self, method: str) -> Preconditioner:
        """The fitted preconditioner of ``method`` (built once, then reused)."""
        self._check_method(method)
        fit_loader = self._train.fit_loader
        source = (lambda: self._train(fit_loader)) if fit_loader is not None else None
        return self.fitted.preconditioner(method, self.config, source, self._reduce)

    def spectrum(self) -> list[dict[str, float | int | str]]:
        """Per block: the fitted GFIM's eigenvalue range, the damping and the damped condition number."""
        return self.fitted.curvature.spectrum(self.config.score.damping, self.config.score.damping_mode)

    def diagnostics(self) -> list[BlockDiagnostics]:
        """Per-block damping and iterative-inverse outcome of every preconditioner built so far."""
        return self._fit.diagnostics() if self._fit is not None else []

    def mean_gradient(self, loader: Iterable[Any], what: str = "loader") -> dict[str, torch.Tensor]:
        """The mean per-block gradient ``v_l`` of the task's measurement over a loader (over every process's shard
        when distributed)."""
        return mean_gradient(
            self._measured,
            loader,
            what,
            dtype=self.config.fit.torch_dtype,
            reduce=self._reduce,
            allow_empty=self.config.runtime.distributed,
        )

    @property
    def results(self) -> Mapping[str, torch.Tensor]:
        """Every result computed so far (``score/<method>``, ``self_influence/<method>``, ...), read-only."""
        return MappingProxyType(self._results)

    @property
    def pass2_path(self) -> str | None:
        """Which training pass scored last: ``"gradients"`` (per-sample gradients) or ``"jvp"`` (forward-mode)."""
        return self._pass2.path

    @property
    def gradient_bytes(self) -> int:
        """Size of all per-sample training gradients, measured by ``fit``."""
        return self._train.gradient_bytes

    def gradient_plan(self, examples: int) -> GradientPlan:
        """What :meth:`fit` will keep for ``examples`` training examples, before it runs: the blocks' layouts,
        the per-example gradients' bytes and whether they stay in memory, go to disk or are recomputed."""
        shapes: dict[tuple[int, int], int] = {}
        for block in self.blocks:
            shapes[block.shape] = shapes.get(block.shape, 0) + 1
        itemsize = torch.empty(0, dtype=self.config.fit.torch_dtype).element_size()
        return self._train.plan(examples, shapes, itemsize)

    @property
    def gradients_cached(self) -> bool:
        """Whether ``fit`` kept the per-sample training gradients for pass 2 (within ``cache_bytes``, or spilled to disk)."""
        return self._train.cached

    @property
    def gradient_store(self) -> str | None:
        """Where ``fit`` kept the training gradients: ``"memory"``, ``"disk"`` (spilled) or ``None`` (pass 2 recomputes them)."""
        return self._train.store

    def save(self, directory: str | Path, *, extra: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write every computed result and ``extra`` tensors (safetensors), the arguments and diagnostics (JSON)."""
        arguments = {
            "method": self.method,
            "blocks": self.block_spec if isinstance(self.block_spec, str) else list(self.block_spec),
            "selected_blocks": [
                {"name": b.name, "r": b.shape[0], "d": b.shape[1], "side": b.side} for b in self.blocks
            ],
            "n_train": self._fit.count if self._fit is not None else None,
            "config": self.config.to_dict(),
        }
        return save_results(
            directory, {**self._results, **(extra or {})}, arguments, [d.to_dict() for d in self.diagnostics()]
        )

    def supports(self, method: str) -> bool:
        """Whether ``method`` can run on this engine's blocks and options (:meth:`unsupported_reason` says why not)."""
        return self.unsupported_reason(method) is None

    def unsupported_reason(self, method: str) -> str | None:
        """Why ``method`` cannot run on this engine's blocks and options (:meth:`check_supports`'s error), or ``None``."""
        try:
            self.check_supports(method)
        except ConfigurationError as error:
            return str(error)
        return None

    def check_supports(self, method: str) -> Method:
        """The registered ``method``, after checking it can run here: its options, the size of the flattened FIM or
        exact curvature it would form, the output functions the exact GGN needs. A ConfigurationError names why not."""
        found = self._check_method(method)
        if found.fim:
            check_fim_size(self.blocks, self.config.runtime.fim_max_params)
        if found.hessian or found.ggn:
            what = GGNAccumulator.what if found.ggn else HessianAccumulator.what
            check_exact_size(self.blocks, self.config.runtime.hessian_max_params, what)
        if found.ggn:
            require_outputs(self.outputs)
        return found

    def _check_method(self, name: str) -> Method:
        method = get_method(name)
        if method.check is not None:
            method.check(self.config)
        return method

    @property
    def fitted(self) -> FittedCurvature:
        """Pass 1's curvature sums (and exact Hessian) and the preconditioners built from them."""
        if self._fit is None:
            raise NotFittedError("call fit(train_loader) (or load_fit(directory)) before scoring.")
        return self._fit

    def _per_example_preconditioner(self, method: str) -> Preconditioner:
        if self._check_method(method).train_pass:
            raise NotImplementedError(
                f"self-influence with {method!r} would need a pass over the training set per example; use 'hyperinf' or 'exact'."
            )
        return self.preconditioner(method)

    def _precondition(self, method: str, vectors: Vectors) -> dict[str, torch.Tensor]:
        """``h = A^{-1} V`` with ``method``, timed into :attr:`ihvp_seconds` (its build counted once)."""
        pre = self.preconditioner(method)
        start = time.perf_counter()
        h = pre.apply(vectors)
        self.ihvp_seconds[method] = self.fitted.take_build_seconds(method) + time.perf_counter() - start
        return h

    def _query_directions(
        self, query_loader: Iterable[Any], method: str, chunk: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        pre = self.preconditioner(method)
        queries = (grads for _, grads in self._measured(query_loader, "query_loader"))
        for stacked in scoring.query_chunks(queries, chunk):
            yield pre.apply(stacked)

    def _keep(self, results: Mapping[str, torch.Tensor]) -> None:
        self._results.update({name: t.detach().cpu() for name, t in results.items()})
