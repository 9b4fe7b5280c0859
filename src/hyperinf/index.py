"""A gradient index: every training example's half-preconditioned gradient, randomly projected and stored once,
so a query costs one gradient and one matrix product instead of a pass over the training set.

For training example ``k`` and block ``l`` the index holds ``P_l (A_l^{-1/2} g_{k,l})``: the gradient times the
symmetric square root of the method's inverse (:meth:`hyperinf.engine.InfluenceEngine.half_preconditioned`)
under a Kronecker-structured Gaussian projection ``P_l: X -> R_l X D_l^T`` (``R_l`` is ``k_r x r``, ``D_l``
``k_d x d``, entries ``N(0, 1/k)``; a side kept whole is not projected), so no ``rd x K`` matrix is ever formed.
A query's gradient is half-preconditioned and projected the same way. ``E[P^T P] = I``, so its score
``-<P A^{-1/2} g_k, P A^{-1/2} q>`` is an unbiased estimate of the engine's ``-<A^{-1} g_k, q>``
(:meth:`~hyperinf.engine.InfluenceEngine.pairwise`), with an error that falls as ``1 / sqrt(dim)``; ``dim=0``
stores the vectors whole (exact scores). Splitting ``A^{-1}`` evenly between the two sides, rather than storing
``A^{-1} g_k``, keeps that error small: it scales with ``||A^{-1/2} g_k|| ||A^{-1/2} q||``, not with
``||A^{-1} g_k|| ||q||``, which the inverse's largest eigenvalues inflate (benchmarks/bench_index.py).

On disk an index is a folder: ``index.json`` (settings, layout, projection seed, block fingerprints, a digest of
the preconditioner, row count), the fit it was built with (``fit/``, which a query loads) and
``chunk-NNNNNN.safetensors`` files, each holding the rows of ``chunk_batches`` loader batches as unit vectors
(``float16`` by default) with their norms (``float32``) and row ids. Chunks are written atomically as the pass
goes, so a killed build resumes after its last whole chunk; ``index.json`` says ``complete`` once every chunk is
there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from hyperinf.blocks import Block, check_fingerprint, fingerprint, tensor_digest
from hyperinf.errors import (
    CheckpointMismatchError,
    ConfigurationError,
    EmptyDataError,
    FitMismatchError,
    NotFittedError,
)
from hyperinf.methods import check_indexable
from hyperinf.results import atomic_write, write_json
from hyperinf.scoring import RunningTopK, TopK

if TYPE_CHECKING:
    from hyperinf.engine import InfluenceEngine

FORMAT = 1
STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_META = "index.json"
_ROW_BLOCK = 65536  # rows scored per matrix product in a query, so the scores of a large index are never all in memory


@dataclass(frozen=True)
class BlockLayout:
    """How one block's ``r x d`` preconditioned gradient is projected: to ``k_r x k_d`` (``k_r == r``: rows kept)."""

    name: str
    r: int
    d: int
    k_r: int
    k_d: int

    @property
    def size(self) -> int:
        return self.k_r * self.k_d


def plan_layout(blocks: Sequence[Block], dim: int) -> list[BlockLayout]:
    """Split ``dim`` projected coordinates over the blocks in proportion to their sizes (at least one each);
    within a block, ``k_r = min(r, floor(sqrt(K)))`` and ``k_d = min(d, K // k_r)``. ``dim=0`` keeps every block whole."""
    if dim < 0:
        raise ValueError(f"dim must be >= 0 (0 keeps the gradients whole), got {dim}")
    total = sum(b.shape[0] * b.shape[1] for b in blocks)
    layouts = []
    for block in blocks:
        r, d = block.shape
        share = r * d if dim == 0 else max(1, round(dim * r * d / total))
        if share >= r * d:
            layouts.append(BlockLayout(block.name, r, d, r, d))
            continue
        k_r = min(r, math.isqrt(share))
        layouts.append(BlockLayout(block.name, r, d, k_r, min(d, share // k_r)))
    return layouts


class Projection:
    """The index's map from per-block ``[m, r, d]`` tensors to ``[m, sum_l k_r k_d]`` rows, drawn from ``seed``."""

    def __init__(self, layouts: Sequence[BlockLayout], seed: int) -> None:
        self.layouts, self.seed = list(layouts), seed
        generator = torch.Generator().manual_seed(seed)
        self._factors: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for layout in self.layouts:  # drawn in block order, so the same layouts and seed give the same matrices
            rows = _gaussian(layout.k_r, layout.r, generator)
            columns = _gaussian(layout.k_d, layout.d, generator)
            self._factors[layout.name] = rows, columns

    @property
    def dim(self) -> int:
        return sum(layout.size for layout in self.layouts)

    def __call__(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pieces = []
        for layout in self.layouts:
            x = vectors[layout.name]
            rows, columns = self._factors[layout.name]
            if rows is not None:
                x = rows.to(x) @ x
            if columns is not None:
                x = x @ columns.to(x).T
            pieces.append(x.reshape(x.shape[0], -1))
        return torch.cat([p.to(pieces[0].device) for p in pieces], dim=1)


def _gaussian(k: int, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """A ``k x n`` matrix with ``N(0, 1/k)`` entries (so ``E[M^T M] = I``), or ``None`` when ``k == n`` (kept whole)."""
    if k == n:
        return None
    return torch.randn(k, n, generator=generator, dtype=torch.float64) / math.sqrt(k)


class GradientIndex:
    """A built index, loaded for queries: unit rows ``[n, D]`` (float32 in memory), their norms and row ids."""

    def __init__(
        self, directory: Path, meta: dict[str, Any], rows: torch.Tensor, norms: torch.Tensor, ids: torch.Tensor
    ):
        self.directory, self.meta = directory, meta
        self.rows, self.norms, self.ids = rows, norms, ids
        self.projection = Projection([BlockLayout(**layout) for layout in meta["layouts"]], meta["seed"])

    @classmethod
    def build(
        cls,
        engine: InfluenceEngine,
        train_loader: Iterable[Any],
        directory: str | Path,
        *,
        dim: int = 8192,
        seed: int = 0,
        method: str | None = None,
        storage: str = "float16",
        chunk_batches: int = 50,
        row_ids: Sequence[int] | None = None,
    ) -> GradientIndex:
        """Index the fitted ``engine``'s training loader (its fit's loader, whose kept gradients are replayed).

        ``dim`` projected coordinates per example in all (``0``: whole), ``method`` the preconditioner (default:
        the engine's), ``storage`` the stored precision of the unit rows, ``row_ids`` what each row is called
        in results (default: its position). A folder holding a partial build with the same settings is resumed;
        one with other settings is refused.
        """
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {', '.join(STORAGE)}, got {storage!r}")
        if chunk_batches < 1:
            raise ValueError(f"chunk_batches must be >= 1, got {chunk_batches}")
        if engine.config.runtime.distributed:
            raise ConfigurationError(
                "a gradient index is built in one process: one index per torch.distributed shard is not supported "
                "yet. Build it without distributed=True."
            )
        directory, method = Path(directory), method or engine.method
        check_indexable(method)
        layouts = plan_layout(engine.blocks, dim)
        settings = {
            "format": FORMAT,
            "method": method,
            "dim": dim,
            "seed": seed,
            "storage": storage,
            "chunk_batches": chunk_batches,
            "layouts": [asdict(layout) for layout in layouts],
            "blocks": fingerprint(engine.blocks),
            "preconditioner": _probe_digest(engine, method),
            "batches": len(train_loader) if isinstance(train_loader, Sized) else None,
        }
        done = _resumable_chunks(directory, settings)
        write_json(directory / _META, {**settings, "complete": False})
        engine.save_fit(directory / "fit")
        projection = Projection(layouts, seed)
        position = sum(load_file(str(_chunk_path(directory, i)))["ids"].numel() for i in range(done))
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        batches = engine.half_preconditioned(train_loader, method=method, skip=done * chunk_batches)
        for h in batches:
            projected = projection(h).float().cpu()
            ids = _ids(row_ids, position, projected.shape[0])
            position += projected.shape[0]
            pending.append((projected, ids))
            if len(pending) == chunk_batches:
                _write_chunk(directory, done, pending, STORAGE[storage])
                done, pending = done + 1, []
        if pending:
            _write_chunk(directory, done, pending, STORAGE[storage])
            done += 1
        if position == 0:
            raise EmptyDataError("train_loader yielded no examples: an index needs at least one training example.")
        write_json(directory / _META, {**settings, "complete": True, "rows": position, "chunks": done})
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | Path) -> GradientIndex:
        """Load a complete index for queries (its rows as float32 in memory)."""
        directory = Path(directory)
        meta_path = directory / _META
        if not meta_path.is_file():
            raise FitMismatchError(
                f"{directory} holds no gradient index ({_META}): build one with GradientIndex.build."
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise FitMismatchError(
                f"{meta_path} has format {meta.get('format')!r}; this hyperinf reads format {FORMAT}: build the index again."
            )
        if not meta.get("complete"):
            raise FitMismatchError(
                f"the index in {directory} is not complete (its build was interrupted): run the same build again to "
                "resume it."
            )
        chunks = [load_file(str(_chunk_path(directory, i))) for i in range(meta["chunks"])]
        rows = torch.cat([c["rows"].float() for c in chunks])
        return cls(
            directory, meta, rows, torch.cat([c["norms"] for c in chunks]), torch.cat([c["ids"] for c in chunks])
        )

    def __len__(self) -> int:
        return self.rows.shape[0]

    def check_engine(self, engine: InfluenceEngine) -> None:
        """Refuse an engine whose blocks or weights are not those the index was built on; load the index's fit into
        an engine without one, and refuse one whose fit, damping or options precondition otherwise."""
        where = f"the index in {self.directory}"
        check_fingerprint(self.meta["blocks"], fingerprint(engine.blocks), where, "build it again")
        try:
            engine.fitted
        except NotFittedError:
            engine.load_fit(self.directory / "fit")
        if _probe_digest(engine, self.meta["method"]) != self.meta["preconditioner"]:
            raise FitMismatchError(
                f"this engine's {self.meta['method']!r} preconditioner differs from the one {where} was built with "
                "(another fit, damping or inverse option): construct the engine with the build's options and "
                f"load_fit({str(self.directory / 'fit')!r})."
            )

    def project_queries(self, engine: InfluenceEngine, query_loader: Iterable[Any]) -> torch.Tensor:
        """Every query example's half-preconditioned measurement gradient under the index's projection, ``[m, D]``
        (float32)."""
        self.check_engine(engine)
        queries = engine.half_preconditioned(query_loader, method=self.meta["method"], queries=True)
        return torch.cat([self.projection(g).float().cpu() for g in queries])

    def scores(self, queries: torch.Tensor, *, normalize: bool = False) -> Iterator[torch.Tensor]:
        """Scores of the indexed rows against projected ``queries`` ``[m, D]``, ``_ROW_BLOCK`` rows at a time
        (``[b, m]`` each): ``-<P A^{-1/2} g_k, P A^{-1/2} q>``, or with ``normalize`` minus their cosine."""
        if normalize:
            queries = queries / queries.norm(dim=1, keepdim=True).clamp_min(torch.finfo(queries.dtype).tiny)
        for start in range(0, len(self), _ROW_BLOCK):
            block = -(self.rows[start : start + _ROW_BLOCK] @ queries.T)
            yield block if normalize else block * self.norms[start : start + _ROW_BLOCK, None]

    def pairwise(
        self, engine: InfluenceEngine, query_loader: Iterable[Any], *, normalize: bool = False
    ) -> torch.Tensor:
        """``[n_train, n_query]`` scores, as :meth:`~hyperinf.engine.InfluenceEngine.pairwise` (estimated when projected)."""
        return torch.cat(list(self.scores(self.project_queries(engine, query_loader), normalize=normalize)))

    def top_k(
        self, engine: InfluenceEngine, query_loader: Iterable[Any], *, k: int = 10, normalize: bool = False
    ) -> TopK:
        """Per query the ``k`` most helpful and most harmful indexed rows (positions in the index; :attr:`ids`
        names them)."""
        return self.search(self.project_queries(engine, query_loader), k=k, normalize=normalize)

    def search(self, queries: torch.Tensor, *, k: int = 10, normalize: bool = False) -> TopK:
        """:meth:`top_k` of queries already projected (:meth:`project_queries`): the part a query's latency is."""
        running = RunningTopK(k)
        for block in self.scores(queries, normalize=normalize):
            running.update(block)
        return running.result()


def _probe_digest(engine: InfluenceEngine, method: str) -> str:
    """A digest of ``method``'s preconditioner applied to a fixed vector: it stands for the fit, damping and method."""
    pre = engine.preconditioner(method)
    dtype = engine.config.fit.torch_dtype
    probe = pre.apply({b.name: torch.ones(1, *b.shape, dtype=dtype, device=b.device) for b in engine.blocks})
    return tensor_digest(probe[b.name] for b in engine.blocks)


def saved_settings(directory: str | Path) -> dict[str, Any] | None:
    """The settings of the index (complete or not) in ``directory``, or ``None`` when it holds none."""
    meta_path = Path(directory) / _META
    return json.loads(meta_path.read_text()) if meta_path.is_file() else None


def _resumable_chunks(directory: Path, settings: Mapping[str, Any]) -> int:
    """How many whole chunks an earlier build with these ``settings`` left in ``directory`` (0 for a new folder)."""
    saved = saved_settings(directory)
    if saved is None:
        return 0
    differ = sorted(key for key in settings if saved.get(key) != settings[key])
    if differ:
        raise CheckpointMismatchError(
            f"{directory} holds an index built with other settings ({', '.join(differ)} differ): choose another "
            "folder, or delete it to build again."
        )
    done = 0
    while _chunk_path(directory, done).is_file():
        done += 1
    return done


def _ids(row_ids: Sequence[int] | None, start: int, count: int) -> torch.Tensor:
    if row_ids is None:
        return torch.arange(start, start + count)
    if start + count > len(row_ids):
        raise ValueError(f"row_ids names {len(row_ids)} rows but the training loader has more")
    return torch.as_tensor(list(row_ids[start : start + count]), dtype=torch.long)


def _chunk_path(directory: Path, index: int) -> Path:
    return directory / f"chunk-{index:06d}.safetensors"


def _write_chunk(
    directory: Path, index: int, batches: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> None:
    """Write one chunk atomically: the rows as unit vectors in ``dtype``, their norms and ids."""
    projected = torch.cat([p for p, _ in batches])
    norms = projected.norm(dim=1)
    unit = projected / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    tensors = {
        "rows": unit.to(dtype).contiguous(),
        "norms": norms.contiguous(),
        "ids": torch.cat([i for _, i in batches]),
    }
    atomic_write(_chunk_path(directory, index), lambda tmp: save_file(tensors, str(tmp)))
