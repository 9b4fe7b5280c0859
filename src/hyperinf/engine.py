"""The public object: ``fit`` (pass 1, curvature) then ``score`` / ``self_influence`` / ``pairwise`` (pass 2).

Scores follow DESIGN.md: ``score_k = - sum_l <h_l, g_{k,l}>`` with ``h_l ~ A_l^{-1} v_l``;
positive scores are harmful (up-weighting the example raises the validation loss), negative
scores helpful.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from hyperinf import distributed
from hyperinf.batches import to_device
from hyperinf.blocks import BlockSpec, select_blocks
from hyperinf.config import InfluenceConfig
from hyperinf.curvature import CurvatureAccumulator
from hyperinf.errors import DeadBlockWarning, EmptyDataError, NotFittedError
from hyperinf.gradients import BatchGradients, LossFn, PerSampleGradients
from hyperinf.hessian import HessianAccumulator
from hyperinf.methods import (
    METHODS,
    NEEDS_FIM,
    NEEDS_HESSIAN,
    BlockDiagnostics,
    Preconditioner,
    build_preconditioner,
)
from hyperinf.results import save_results


class InfluenceEngine:
    """Influence of training examples on a validation set, for any PyTorch model.

    ``loss_fn(model, batch)`` returns per-example losses ``[B]``. ``blocks`` is ``"lora"``,
    ``"linear"`` or a list of module names; ``method`` one of :data:`hyperinf.methods.METHODS`.
    Other keyword options are the fields of :class:`hyperinf.config.InfluenceConfig`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        blocks: BlockSpec = "lora",
        method: str = "hyperinf",
        **options: Any,
    ) -> None:
        _check_method(method)
        self.model = model
        self.method = method
        self.block_spec = blocks
        self.config = InfluenceConfig(**options)
        if self.config.distributed:
            distributed.require_initialized()
        self.blocks = select_blocks(model, blocks, side=self.config.side, include_bias=self.config.include_bias)
        self.gradients = PerSampleGradients(model, loss_fn, self.blocks, dtype=self.config.torch_dtype)
        self.device = next(model.parameters()).device
        self.results: dict[str, torch.Tensor] = {}
        self._curvature: CurvatureAccumulator | None = None
        self._hessian: torch.Tensor | None = None
        self._cache: list[BatchGradients] | None = None
        self._fit_loader: Iterable[Any] | None = None
        self._preconditioners: dict[str, Preconditioner] = {}
        self.ihvp_seconds: dict[str, float] = {}
        self.gradient_bytes = 0  # size of all per-sample training gradients, measured by fit
        self._build_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ pass 1
    def fit(self, train_loader: Iterable[Any], *, methods: Sequence[str] = ()) -> InfluenceEngine:
        """Accumulate the curvature every method in ``{method} | methods`` needs, in one pass."""
        wanted = {self.method, *methods}
        for m in wanted:
            _check_method(m)
        _check_order(train_loader, "train_loader")
        fim = bool(wanted & NEEDS_FIM)
        if fim:
            self._check_fim_size()
        curvature = CurvatureAccumulator(self.blocks, fim=fim, dtype=self.config.torch_dtype, device=self.device)
        hessian = (
            HessianAccumulator(self.blocks, max_params=self.config.hessian_max_params, dtype=self.config.torch_dtype)
            if wanted & NEEDS_HESSIAN
            else None
        )
        cache: list[BatchGradients] | None = []
        gradient_bytes = 0
        with _eval_mode(self.model):
            for index, batch in enumerate(self._progress(train_loader, "fit: curvature")):
                batch = to_device(batch, self.device)
                grads = self.gradients(batch, batch_index=index)
                curvature.update(grads.grads)
                if hessian is not None:
                    hessian.update(self.model, self.gradients.loss_fn, batch)
                gradient_bytes += sum(g.numel() * g.element_size() for g in grads.grads.values())
                if cache is not None:
                    if gradient_bytes <= self.config.cache_bytes:
                        cache.append(grads)
                    else:
                        cache = None  # over budget: pass 2 recomputes the gradients
        curvature.count = self._sum_over_processes(curvature.tensors(), curvature.count)
        if hessian is not None:
            hessian.count = self._sum_over_processes(hessian.tensors(), hessian.count)
        if curvature.count == 0:
            raise EmptyDataError("train_loader yielded no examples: fit needs at least one training example.")
        dead = curvature.dead_blocks()
        if dead:
            warnings.warn(
                f"block(s) {', '.join(dead)} have zero gradient on every training example, so they add nothing "
                "to any score (a fresh peft adapter's lora_A gets no gradient while lora_B is zero: train it first).",
                DeadBlockWarning,
                stacklevel=2,
            )
        self._curvature = curvature
        self._hessian = hessian.hessian() if hessian is not None else None
        self._cache = cache
        self.gradient_bytes = gradient_bytes
        self._fit_loader = train_loader
        self._preconditioners = {}
        return self

    # ------------------------------------------------------------------ pass 2
    def score(self, train_loader: Iterable[Any], val_loader: Iterable[Any], *, method: str | None = None) -> torch.Tensor:
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
    ) -> dict[str, torch.Tensor]:
        """:meth:`score` for several methods with one validation pass and one training pass.

        The time each method took to turn ``v`` into ``h``, building its inverse (or, for DataInf,
        its pass over the training gradients) included, is kept in :attr:`ihvp_seconds`. The same
        training pass keeps each example's training loss (``results["train_loss"]``) and, with
        ``self_influence=method``, its self-influence (``results["self_influence/<method>"]``):
        where the gradients are recomputed, a second pass would cost as much as the first.
        """
        own = self._per_example_preconditioner(self_influence) if self_influence else None
        v = self.mean_gradient(val_loader, "val_loader")
        directions = {}
        for method in methods:
            pre = self.preconditioner(method)
            start = time.perf_counter()
            directions[method] = pre.apply({name: g.unsqueeze(0) for name, g in v.items()})
            self.ihvp_seconds[method] = self._build_seconds[method] + time.perf_counter() - start
        columns: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
        losses, self_scores = [], []
        for batch in self.train_gradients(train_loader):
            losses.append(batch.losses.detach())
            for method, h in directions.items():
                columns[method].append(-_inner(batch.grads, h)[:, 0])
            if own is not None:
                self_scores.append(_self_influence(own, batch))
        scores = {method: torch.cat(parts) for method, parts in columns.items()}
        self.results.update({f"score/{method}": s.cpu() for method, s in scores.items()})
        self.results["train_loss"] = torch.cat(losses).cpu()
        if own is not None:
            self.results[f"self_influence/{self_influence}"] = torch.cat(self_scores).cpu()
        return scores

    def self_influence(self, train_loader: Iterable[Any], *, method: str | None = None) -> torch.Tensor:
        """``- sum_l <A_l^{-1} g_k, g_k>`` per training example (<= 0; most negative = most unusual)."""
        method = method or self.method
        pre = self._per_example_preconditioner(method)
        result = torch.cat([_self_influence(pre, batch) for batch in self.train_gradients(train_loader)])
        self.results[f"self_influence/{method}"] = result.cpu()
        return result

    def pairwise(
        self,
        train_loader: Iterable[Any],
        query_loader: Iterable[Any],
        *,
        method: str | None = None,
        query_chunk: int = 256,
    ) -> torch.Tensor:
        """Influence of each training example on each query's loss, ``[n_train, n_query]``.

        Queries are preconditioned ``query_chunk`` at a time, so memory holds one chunk of query
        gradients next to one batch of training gradients.
        """
        method = method or self.method
        pre = self.preconditioner(method)
        columns = [
            self._pairwise_chunk(pre, chunk, train_loader)
            for chunk in _chunks(self._batches(query_loader, "query_loader", "pairwise: queries"), query_chunk)
        ]
        result = torch.cat(columns, dim=1)
        self.results[f"pairwise/{method}"] = result.cpu()
        return result

    # ------------------------------------------------------------------ parts
    def preconditioner(self, method: str) -> Preconditioner:
        """The fitted preconditioner of ``method`` (built once, then reused)."""
        _check_method(method)
        if self._curvature is None:
            raise NotFittedError("call fit(train_loader) before scoring.")
        if method in NEEDS_FIM and self._curvature.fim is None:
            raise NotFittedError(f"method {method!r} needs the flattened FIM: call fit(train_loader, methods=[{method!r}]).")
        if method in NEEDS_HESSIAN and self._hessian is None:
            raise NotFittedError(f"method {method!r} needs the exact Hessian: call fit(train_loader, methods=[{method!r}]).")
        if method not in self._preconditioners:
            start = time.perf_counter()
            self._preconditioners[method] = build_preconditioner(
                method,
                self._curvature,
                self.config,
                hessian=self._hessian,
                train_gradients=lambda: self.train_gradients(self._fit_loader),
                reduce=self._sum_over_processes,
            )
            self._build_seconds[method] = time.perf_counter() - start
        return self._preconditioners[method]

    def _per_example_preconditioner(self, method: str) -> Preconditioner:
        pre = self.preconditioner(method)
        if not pre.per_example:
            raise NotImplementedError(
                f"self-influence with {method!r} would need a pass over the training set per example; "
                "use 'hyperinf' or 'exact'."
            )
        return pre

    def spectrum(self) -> list[dict[str, float | int | str]]:
        """Per block: the fitted GFIM's eigenvalue range, the damping and the damped condition number."""
        if self._curvature is None:
            raise NotFittedError("call fit(train_loader) before asking for the spectrum.")
        return self._curvature.spectrum(self.config.damping, self.config.damping_mode)

    def diagnostics(self) -> list[BlockDiagnostics]:
        """Per-block damping and iterative-inverse outcome of every preconditioner built so far."""
        return [d for pre in self._preconditioners.values() for d in pre.diagnostics]

    def mean_gradient(self, loader: Iterable[Any], what: str = "loader") -> dict[str, torch.Tensor]:
        """The mean per-block gradient ``v_l`` over a loader (over every process's shard when distributed)."""
        dtype = self.config.torch_dtype
        total = {b.name: torch.zeros(b.shape, dtype=dtype, device=self.device) for b in self.blocks}
        count = 0
        for batch in self._batches(loader, what, f"gradients: {what}", allow_empty=self.config.distributed):
            count += batch.batch_size
            for name, g in batch.grads.items():
                total[name] += g.sum(0)
        count = self._sum_over_processes(list(total.values()), count)
        if count == 0:
            raise EmptyDataError(f"{what} yielded no examples: pass a loader over at least one example.")
        return {name: t / count for name, t in total.items()}

    @property
    def gradients_cached(self) -> bool:
        """Whether ``fit`` kept the per-sample training gradients (they fit ``cache_bytes``) for pass 2."""
        return self._cache is not None

    def train_gradients(self, train_loader: Iterable[Any]) -> Iterator[BatchGradients]:
        """Per-sample training gradients: from the ``fit`` cache when it holds this loader, else recomputed."""
        if self._cache is not None and train_loader is self._fit_loader:
            yield from self._cache
            return
        _check_order(train_loader, "train_loader")
        yield from self._batches(train_loader, "train_loader", "gradients: train")

    def save(self, directory: str | Path) -> Path:
        """Write every computed result (safetensors), the arguments and diagnostics (JSON) to ``directory``."""
        arguments = {
            "method": self.method,
            "blocks": self.block_spec if isinstance(self.block_spec, str) else list(self.block_spec),
            "selected_blocks": [{"name": b.name, "r": b.shape[0], "d": b.shape[1], "side": b.side} for b in self.blocks],
            "n_train": self._curvature.count if self._curvature is not None else None,
            "config": self.config.to_dict(),
        }
        return save_results(directory, self.results, arguments, [d.to_dict() for d in self.diagnostics()])

    # ------------------------------------------------------------------ helpers
    def _sum_over_processes(self, tensors: list[torch.Tensor], count: int) -> int:
        """Sum ``tensors`` in place over processes and return the total ``count`` (as is on one process)."""
        if not self.config.distributed:
            return count
        total = torch.tensor(count, dtype=torch.int64, device=self.device)
        distributed.all_reduce_sum([*tensors, total])
        return int(total)

    def _batches(self, loader: Iterable[Any], what: str, desc: str, allow_empty: bool = False) -> Iterator[BatchGradients]:
        seen = 0
        with _eval_mode(self.model):
            for index, batch in enumerate(self._progress(loader, desc)):
                grads = self.gradients(to_device(batch, self.device), batch_index=index)
                seen += grads.batch_size
                yield grads
        if seen == 0 and not allow_empty:
            raise EmptyDataError(f"{what} yielded no examples: pass a loader over at least one example.")

    def _pairwise_chunk(self, pre: Preconditioner, queries: list[BatchGradients], train_loader: Iterable[Any]) -> torch.Tensor:
        stacked = {name: torch.cat([q.grads[name] for q in queries]) for name in queries[0].grads}
        h = pre.apply(stacked)
        return torch.cat([-_inner(batch.grads, h) for batch in self.train_gradients(train_loader)])

    def _check_fim_size(self) -> None:
        too_big = [b for b in self.blocks if b.num_params > self.config.fim_max_params]
        if too_big:
            b = too_big[0]
            raise ValueError(
                f"the flattened FIM of block {b.name!r} would be {b.num_params} x {b.num_params} "
                f"(limit fim_max_params={self.config.fim_max_params}); use 'hyperinf' (GFIM, "
                f"{b.shape[1]} x {b.shape[1]}) or a smaller LoRA rank."
            )

    def _progress(self, loader: Iterable[Any], desc: str) -> Iterable[Any]:
        return tqdm(loader, desc=desc, disable=not self.config.progress, leave=False)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _check_order(loader: Iterable[Any], what: str) -> None:
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
        raise ValueError(
            f"{what} shuffles its data: scores are returned in loader order, so use shuffle=False."
        )


def _flatten(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate per-block ``[m, r, d]`` tensors into one ``[m, sum_l r_l d_l]`` matrix."""
    m = next(iter(blocks.values())).shape[0]
    return torch.cat([t.reshape(m, -1) for t in blocks.values()], dim=1)


def _self_influence(pre: Preconditioner, batch: BatchGradients) -> torch.Tensor:
    """``- sum_l <A_l^{-1} g_k, g_k>`` for each example of a batch."""
    return -(_flatten(batch.grads) * _flatten(pre.apply(batch.grads))).sum(dim=1)


def _inner(grads: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_l <g_{k,l}, h_{j,l}>`` for every training row k and preconditioned column j: ``[B, m]``."""
    return sum(torch.einsum("brd,mrd->bm", grads[name], h[name].to(grads[name].dtype)) for name in grads)


def _chunks(items: Iterable[BatchGradients], size: int) -> Iterator[list[BatchGradients]]:
    chunk: list[BatchGradients] = []
    rows = 0
    for item in items:
        chunk.append(item)
        rows += item.batch_size
        if rows >= size:
            yield chunk
            chunk, rows = [], 0
    if chunk:
        yield chunk


class _eval_mode:
    """Run the model in eval mode (no dropout) and restore its training flag after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
