"""A gradient index: every training example's gradient, randomly projected and stored once, with the curvature of the
projected gradients, so a query costs one gradient and one matrix product instead of a pass over the training set.

For training example ``k`` and block ``l`` the index holds ``P_l g_{k,l}``, the gradient under a Kronecker-structured
Gaussian projection ``P_l: X -> R_l X D_l^T`` (``R_l`` is ``k_r x r``, ``D_l`` ``k_d x d``, entries ``N(0, 1/k)``;
a side kept whole is not projected), so no ``rd x K`` matrix is ever formed. ``P_l g`` is the gradient of the same
loss with respect to ``Theta_l`` when the block's weight is restricted to ``W_l + R_l^T Theta_l D_l``: the index is
that model's influence, computed exactly in its ``k_r x k_d`` blocks. The curvature (the GFIM of the projected
blocks, ``k_d x k_d``) is summed from the stored rows, and a query's projected gradient is preconditioned there by
any GFIM method of the registry (``hyperinf``: Schulz; ``exact``; ``lissa``; ``tracin``) with the engine's damping:
``score_k = -<P g_k, A_P^{-1} P q>``. ``dim=0`` keeps every block whole: the engine's exact scores. Built with
``kronecker=True``, the index also sums the projected layers' token factors (``(D_l x_t)(D_l x_t)^T`` and
``(R_l y_t)(R_l y_t)^T`` over tokens: the K-FAC factors of the projected model), so ``kfac`` and ``ekfac`` (whose
eigenvalues are refit on the stored rows) precondition in their eigenbases too.

Why precondition after projecting (LoGra's order) and not project ``A^{-1/2} g_k`` and ``A^{-1/2} q`` (an unbiased
estimate of the unprojected scores, commit 0018f4c): on the MNIST MLP the unbiased estimate's LDS fell from 0.469 (whole) to 0.11 / 0.14 / 0.30
at 1k / 4k / 16k coordinates, its noise swamping scores that are small next to the vectors' norms, while the
projected model's influence kept 0.45 / 0.51 / 0.51 (docs/results/index.md).

Under ``torch.distributed`` each process indexes its shard into ``shard-<rank>/`` of the folder, and
:meth:`GradientIndex.open` of the folder loads every shard as one index (curvature sums add up). On disk an index is
a folder: ``index.json`` (settings, layout, projection seed, block fingerprints, row count),
``curvature.safetensors`` (the projected blocks' curvature sums), with ``kronecker=True`` ``kronecker.safetensors``
(the token factors' sums over the chunks written so far), and ``chunk-NNNNNN.safetensors`` files, each
holding the rows of ``chunk_batches`` loader batches as unit vectors (``float16`` by default) with their norms
(``float32``) and row ids. Chunks are written atomically as the pass goes, so a killed build resumes after its
last whole chunk; ``index.json`` says ``complete`` once every chunk and the curvature are there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hyperinf.blocks import Block, check_fingerprint, fingerprint
from hyperinf.curvature import CurvatureAccumulator, KroneckerAccumulator
from hyperinf.errors import CheckpointMismatchError, ConfigurationError, FitMismatchError
from hyperinf.gradients import BatchGradients, Factors, TokenFactors, project_matrix
from hyperinf.methods import FittedInputs, build_preconditioner, get_method, method_names
from hyperinf.preconditioners import Preconditioner
from hyperinf.results import atomic_write, write_json
from hyperinf.scoring import RunningTopK, TopK

if TYPE_CHECKING:
    from hyperinf.config import InfluenceConfig
    from hyperinf.engine import InfluenceEngine

FORMAT = 2  # 1: projected A^{-1/2} g_k (commit 0018f4c), no longer read
STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_META, _CURVATURE, _KRONECKER = "index.json", "curvature.safetensors", "kronecker.safetensors"
_ROW_BLOCK = 65536  # rows scored per matrix product in a query, so the scores of a large index are never all in memory
_REFIT_ROWS = 4096  # rows per batch of EK-FAC's eigenvalue refit (float64 copies of whole rows)


def index_methods() -> tuple[str, ...]:
    """The methods an index preconditions with: those built from the GFIM, the Kronecker factors or nothing, and
    not summing over the training gradients at every query."""
    return tuple(
        name
        for name in method_names()
        if set(get_method(name).needs()) <= {"gfim", "kronecker"} and not get_method(name).train_pass
    )


def check_index_method(method: str) -> None:
    """Refuse a method that cannot precondition in an index (before anything is built for it)."""
    if method not in index_methods():
        raise ConfigurationError(
            f"method {method!r} cannot precondition in an index: it needs more than the projected blocks' GFIM or "
            f"Kronecker factors. Use one of: {', '.join(index_methods())}."
        )


def needs_kronecker(method: str) -> bool:
    """Whether an index must be built with ``kronecker=True`` for ``method`` to precondition in it."""
    return "kronecker" in get_method(method).needs()


@dataclass(frozen=True)
class BlockLayout:
    """How one block's ``r x d`` gradient is projected: to ``k_r x k_d`` (``k_r == r``: rows kept)."""

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
        k_r = min(r, max(math.isqrt(share), share // d))  # a narrow d leaves the rows more of the share
        layouts.append(BlockLayout(block.name, r, d, k_r, min(d, share // k_r)))
    return layouts


class Projection:
    """The index's map from per-block ``[m, r, d]`` tensors to ``[m, k_r, k_d]`` ones, drawn from ``seed``."""

    def __init__(self, layouts: Sequence[BlockLayout], seed: int) -> None:
        self.layouts, self.seed = list(layouts), seed
        generator = torch.Generator().manual_seed(seed)
        self._factors: dict[str, Factors] = {}
        for layout in self.layouts:  # drawn in block order, so the same layouts and seed give the same matrices
            rows = _gaussian(layout.k_r, layout.r, generator)
            columns = _gaussian(layout.k_d, layout.d, generator)
            self._factors[layout.name] = rows, columns

    @property
    def dim(self) -> int:
        return sum(layout.size for layout in self.layouts)

    @property
    def factors(self) -> dict[str, Factors]:
        """Per block ``(R_l, D_l)`` (``None``: a side kept whole), as the engine's projected gradients take them."""
        return dict(self._factors)

    def blocks(self, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``R_l V_l D_l^T`` for every block."""
        return {
            layout.name: project_matrix(vectors[layout.name], self._factors[layout.name]) for layout in self.layouts
        }

    def flat(self, blocks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Projected blocks as one row per example, ``[m, dim]`` (float32, on the CPU)."""
        return torch.cat(
            [blocks[layout.name].reshape(blocks[layout.name].shape[0], -1).float().cpu() for layout in self.layouts],
            dim=1,
        )

    def unflat(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`flat`: ``[m, dim]`` rows as per-block ``[m, k_r, k_d]`` views."""
        pieces = rows.split([layout.size for layout in self.layouts], dim=1)
        return {layout.name: piece.reshape(-1, layout.k_r, layout.k_d) for layout, piece in zip(self.layouts, pieces)}


def _gaussian(k: int, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """A ``k x n`` matrix with ``N(0, 1/k)`` entries (so ``E[M^T M] = I``), or ``None`` when ``k == n`` (kept whole)."""
    if k == n:
        return None
    return torch.randn(k, n, generator=generator, dtype=torch.float64) / math.sqrt(k)


def projected_blocks(layouts: Sequence[BlockLayout]) -> list[Block]:
    """The projected model's blocks: a ``k_d -> k_r`` linear layer per block, named as the block it projects, for
    the curvature and the methods (their weights are never read)."""
    return [
        Block(layout.name, nn.utils.skip_init(nn.Linear, layout.k_d, layout.k_r, bias=False), "in", False)
        for layout in layouts
    ]


class GradientIndex:
    """A built index, loaded for queries: unit rows ``[n, D]`` (float32 in memory), their norms, row ids and the
    projected blocks' curvature."""

    def __init__(
        self,
        directory: Path,
        meta: dict[str, Any],
        rows: torch.Tensor,
        norms: torch.Tensor,
        ids: torch.Tensor,
        curvature: CurvatureAccumulator,
        kronecker: KroneckerAccumulator | None = None,
    ) -> None:
        self.directory, self.meta = directory, meta
        self.rows, self.norms, self.ids = rows, norms, ids
        self.curvature, self.kronecker = curvature, kronecker
        self.projection = Projection([BlockLayout(**layout) for layout in meta["layouts"]], meta["seed"])
        self._built: dict[tuple[str, str], Preconditioner] = {}

    @classmethod
    def build(
        cls,
        engine: InfluenceEngine,
        train_loader: Iterable[Any],
        directory: str | Path,
        *,
        dim: int = 8192,
        seed: int = 0,
        storage: str = "float16",
        chunk_batches: int = 50,
        row_ids: Sequence[int] | None = None,
        source: str | None = None,
        kronecker: bool = False,
    ) -> GradientIndex:
        """Index ``train_loader``'s per-example gradients under ``engine``'s model, blocks and loss (no fit needed;
        pass 1's kept gradients are replayed when this is its loader).

        ``dim`` projected coordinates per example in all (``0``: whole), ``storage`` the stored precision of the
        unit rows, ``row_ids`` what each row is called in results (default: its position; under torch.distributed,
        the process's own shard's ids, or positions in :func:`hyperinf.distributed.shard`'s contiguous shards, which
        opening the folder shifts to positions in the whole), ``source`` a digest of
        what the gradients depend on beyond the weights and the loader's length (the rows, the loss), when the
        caller has one. ``kronecker`` also sums the projected layers' token factors, for ``kfac`` / ``ekfac``
        queries (computed here then, never replayed from pass 1). A folder holding a partial build with the same
        settings is resumed; one with other settings is refused.
        """
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {', '.join(STORAGE)}, got {storage!r}")
        if chunk_batches < 1:
            raise ValueError(f"chunk_batches must be >= 1, got {chunk_batches}")
        directory, shard = Path(directory), None
        if engine.config.runtime.distributed:  # each process indexes its shard, in a folder of its own
            shard = {"rank": dist.get_rank(), "of": dist.get_world_size()}
            directory = directory / f"shard-{shard['rank']:05d}"
        layouts = plan_layout(engine.blocks, dim)
        settings = {
            "format": FORMAT,
            "shard": shard,
            "ids": "positions" if row_ids is None else "given",
            "dim": dim,
            "seed": seed,
            "storage": storage,
            "chunk_batches": chunk_batches,
            "layouts": [asdict(layout) for layout in layouts],
            "blocks": fingerprint(engine.blocks),
            "dtype": engine.config.fit.dtype,
            "batches": len(train_loader) if isinstance(train_loader, Sized) else None,
            "source": source,
            "kronecker": kronecker,
        }
        done = _resumable_chunks(directory, settings)
        write_json(directory / _META, {**settings, "complete": False})
        projection = Projection(layouts, seed)
        factors = KroneckerAccumulator(projected_blocks(layouts), dtype=torch.float64) if kronecker else None
        if factors is not None:  # resume from the factors' sums over the chunks they cover
            done = _load_kronecker(directory, factors, done)
        position = sum(_chunk_rows(directory, i) for i in range(done))
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        for grads, tokens in _gradient_batches(engine, train_loader, projection, done * chunk_batches, kronecker):
            projected = projection.flat(grads)
            pending.append((projected, _ids(row_ids, position, projected.shape[0])))
            position += projected.shape[0]
            if factors is not None and tokens is not None:
                factors.update(tokens, projected.shape[0])
            if len(pending) == chunk_batches:
                done, pending = _write_chunk(directory, done, pending, STORAGE[storage], factors), []
        if pending:
            done = _write_chunk(directory, done, pending, STORAGE[storage], factors)
        curvature = CurvatureAccumulator(projected_blocks(layouts), dtype=torch.float64)
        for i in range(done):  # from the stored rows: the curvature of exactly what the queries are scored against
            chunk = load_file(str(_chunk_path(directory, i)))
            curvature.update(projection.unflat(chunk["rows"].double() * chunk["norms"].double().unsqueeze(1)))
        atomic_write(directory / _CURVATURE, lambda tmp: save_file(curvature.named_tensors(), str(tmp)))
        write_json(directory / _META, {**settings, "complete": True, "rows": position, "chunks": done})
        if shard is not None:  # every process returns the whole index, once every shard is written
            dist.barrier()
            return cls.open(directory.parent)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | Path) -> GradientIndex:
        """Load a complete index for queries (its rows as float32 in memory); a folder of per-process shards (built
        under torch.distributed) as one index of every shard's rows, in rank order."""
        directory = Path(directory)
        meta = saved_settings(directory)
        shards = sorted(directory.glob("shard-*/" + _META))
        if meta is not None and shards:
            raise FitMismatchError(
                f"{directory} holds both an index and per-process index shards (shard-*/): keep one of the two, "
                "or build into another folder."
            )
        if shards:
            return cls._merged(directory, [cls.open(path.parent) for path in shards])
        if meta is None:
            raise FitMismatchError(
                f"{directory} holds no gradient index ({_META}): build one with `hyperinf index build` or GradientIndex.build."
            )
        if meta.get("format") != FORMAT:
            raise FitMismatchError(
                f"{directory / _META} has format {meta.get('format')!r}; this hyperinf reads format {FORMAT}: build "
                "the index again."
            )
        if not meta.get("complete"):
            raise FitMismatchError(
                f"the index in {directory} is not complete (its build was interrupted): run the same build again to "
                "resume it."
            )
        chunks = [load_file(str(_chunk_path(directory, i))) for i in range(meta["chunks"])]
        layouts = [BlockLayout(**layout) for layout in meta["layouts"]]
        curvature = CurvatureAccumulator(projected_blocks(layouts), dtype=torch.float64)
        curvature.load(load_file(str(directory / _CURVATURE)), meta["rows"])
        rows = torch.cat([c["rows"].float() for c in chunks])
        norms, ids = torch.cat([c["norms"] for c in chunks]), torch.cat([c["ids"] for c in chunks])
        factors = None
        if meta["kronecker"]:
            factors = KroneckerAccumulator(projected_blocks(layouts), dtype=torch.float64)
            if _load_kronecker(directory, factors, meta["chunks"]) != meta["chunks"] or factors.count != meta["rows"]:
                raise FitMismatchError(
                    f"the Kronecker factors in {directory / _KRONECKER} are missing or do not cover every row of the "
                    "index: delete the folder and build it again"
                )
        return cls(directory, meta, rows, norms, ids, curvature, factors)

    @classmethod
    def _merged(cls, directory: Path, shards: list[GradientIndex]) -> GradientIndex:
        """One index of every shard's rows in rank order, their curvature summed; positions as row ids are shifted
        to positions in the whole (shards of :func:`hyperinf.distributed.shard` are contiguous)."""
        first = shards[0].meta
        ranks = [s.meta["shard"]["rank"] for s in shards]
        if ranks != list(range(first["shard"]["of"])):
            raise FitMismatchError(
                f"{directory} holds the index shards of ranks {ranks}, not all {first['shard']['of']}: finish the "
                "build on every process."
            )
        shared = ("dim", "seed", "storage", "layouts", "blocks", "dtype", "ids", "kronecker")
        differ = sorted({key for s in shards for key in shared if s.meta[key] != first[key]})
        if differ:
            raise FitMismatchError(f"the index shards in {directory} were built with other {', '.join(differ)}")
        ids, offset = [], 0
        for s in shards:
            ids.append(s.ids + offset if first["ids"] == "positions" else s.ids)
            offset += len(s)
        curvature, factors = shards[0].curvature, shards[0].kronecker
        for s in shards[1:]:
            curvature.merge(s.curvature)
            if factors is not None:  # every shard has them: "kronecker" is a shared setting
                assert s.kronecker is not None
                factors.merge(s.kronecker)
        if first["ids"] == "given" and len(set(torch.cat(ids).tolist())) < offset:
            raise FitMismatchError(
                f"the index shards in {directory} name some rows twice: give each process its own shard's row ids."
            )
        meta = {**first, "shard": None, "rows": offset, "shards": len(shards)}
        rows, norms = torch.cat([s.rows for s in shards]), torch.cat([s.norms for s in shards])
        return cls(directory, meta, rows, norms, torch.cat(ids), curvature, factors)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def check_engine(self, engine: InfluenceEngine) -> None:
        """Refuse an engine whose blocks or weights are not those the index was built on."""
        where = f"the index in {self.directory}"
        check_fingerprint(self.meta["blocks"], fingerprint(engine.blocks), where, "build it again")

    def preconditioner(self, method: str, config: InfluenceConfig) -> Preconditioner:
        """``method``'s preconditioner of the projected blocks under ``config``'s damping and inverse options (built
        once per method and options)."""
        self.check_method(method)
        key = (method, json.dumps(config.to_dict(), sort_keys=True, default=str))
        if key not in self._built:
            fitted = FittedInputs(
                self.curvature, config, kronecker=self.kronecker, train_gradients=self._stored_gradients
            )
            self._built[key] = build_preconditioner(method, fitted)
        return self._built[key]

    def check_method(self, method: str) -> None:
        """Refuse a method this index cannot precondition with (before any query gradient is computed)."""
        check_index_method(method)
        if needs_kronecker(method) and self.kronecker is None:
            raise FitMismatchError(
                f"method {method!r} needs the projected layers' Kronecker factors, and the index in {self.directory} "
                f"was built without them: build one with kronecker=True (hyperinf index build --method {method}) "
                "in another folder, or query with a GFIM method."
            )

    def _stored_gradients(self) -> Iterator[BatchGradients]:
        """The indexed rows as projected per-block gradients, ``_REFIT_ROWS`` rows at a time (for EK-FAC's
        eigenvalue refit: the curvature of exactly what the queries are scored against)."""
        for start in range(0, len(self), _REFIT_ROWS):
            rows = self.rows[start : start + _REFIT_ROWS].double() * self.norms[start : start + _REFIT_ROWS, None]
            no_losses = torch.full((rows.shape[0],), float("nan"))  # an index keeps no losses; EK-FAC reads none
            yield BatchGradients(no_losses, self.projection.unflat(rows))

    def project_queries(
        self, engine: InfluenceEngine, query_loader: Iterable[Any], *, method: str | None = None
    ) -> torch.Tensor:
        """Every query example's measurement gradient, projected and preconditioned in the projected blocks with
        ``method`` (default: the engine's) under the engine's damping: ``A_P^{-1} P q``, ``[m, D]`` (float32)."""
        self.check_engine(engine)
        pre = self.preconditioner(method or engine.method, engine.config)
        queries = []
        for grads in engine.per_example_gradients(query_loader, queries=True, project=self.projection.factors):
            projected = {name: g.double().cpu() for name, g in grads.items()}
            queries.append(self.projection.flat(pre.apply(projected)))
        return torch.cat(queries)

    def scores(self, queries: torch.Tensor, *, normalize: bool = False) -> Iterator[torch.Tensor]:
        """Scores of the indexed rows against :meth:`project_queries`' ``queries`` ``[m, D]``, ``_ROW_BLOCK`` rows at
        a time (``[b, m]`` each): ``-<P g_k, A_P^{-1} P q>``, or with ``normalize`` minus the cosine of ``P g_k``
        and ``A_P^{-1} P q`` (of the projected gradients themselves with ``tracin``: LESS's ranking)."""
        if normalize:
            queries = unit_rows(queries)
        for start in range(0, len(self), _ROW_BLOCK):
            block = -(self.rows[start : start + _ROW_BLOCK] @ queries.T)
            yield block if normalize else block * self.norms[start : start + _ROW_BLOCK, None]

    def pairwise(
        self,
        engine: InfluenceEngine,
        query_loader: Iterable[Any],
        *,
        method: str | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """``[n_train, n_query]`` scores, as :meth:`~hyperinf.engine.InfluenceEngine.pairwise` (of the projected model)."""
        queries = self.project_queries(engine, query_loader, method=method)
        return torch.cat(list(self.scores(queries, normalize=normalize)))

    def top_k(
        self,
        engine: InfluenceEngine,
        query_loader: Iterable[Any],
        *,
        k: int = 10,
        method: str | None = None,
        normalize: bool = False,
    ) -> TopK:
        """Per query the ``k`` most helpful and most harmful indexed rows (positions in the index; :attr:`ids`
        names them)."""
        return self.search(self.project_queries(engine, query_loader, method=method), k=k, normalize=normalize)

    def search(self, queries: torch.Tensor, *, k: int = 10, normalize: bool = False) -> TopK:
        """:meth:`top_k` of queries already projected and preconditioned (:meth:`project_queries`): the part a
        query's latency is."""
        running = RunningTopK(k)
        for block in self.scores(queries, normalize=normalize):
            running.update(block)
        return running.result()


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` ``[m, D]`` scaled to unit length per row (a zero row stays zero): cosine rankings' queries."""
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)


def saved_settings(directory: str | Path) -> dict[str, Any] | None:
    """The settings of the index (complete or not) in ``directory``, or ``None`` when it holds none."""
    meta_path = Path(directory) / _META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    meta.setdefault("kronecker", False)  # indexes written before the factors could be indexed have none
    return meta


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


def _gradient_batches(
    engine: InfluenceEngine, loader: Iterable[Any], projection: Projection, skip: int, kronecker: bool
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, TokenFactors] | None]]:
    """Per batch after ``skip``, the projected gradients and, with ``kronecker``, the projected token factors
    (computed from the loader; without them pass 1's kept gradients are replayed when this is its loader)."""
    if kronecker:
        for batch in engine.projected_gradients(loader, projection.factors, skip=skip, kronecker=True):
            yield batch.grads, batch.factors
    else:
        for grads in engine.per_example_gradients(loader, skip=skip, project=projection.factors):
            yield grads, None


def _load_kronecker(directory: Path, factors: KroneckerAccumulator, done: int) -> int:
    """Load the factors' sums saved after the last chunk written, and return how many chunks they cover (at most
    ``done``: a chunk written after them, by a build killed in between, is rewritten)."""
    path = directory / _KRONECKER
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as handle:
        covered, count = int(handle.metadata()["chunks"]), int(handle.metadata()["count"])
    if covered > done:
        raise FitMismatchError(
            f"{path} covers {covered} chunks but {directory} holds {done}: delete the folder and build it again"
        )
    factors.load(load_file(str(path)), count)
    return covered


def _ids(row_ids: Sequence[int] | None, start: int, count: int) -> torch.Tensor:
    if row_ids is None:
        return torch.arange(start, start + count)
    if start + count > len(row_ids):
        raise ValueError(f"row_ids names {len(row_ids)} rows but the training loader has more")
    return torch.as_tensor(list(row_ids[start : start + count]), dtype=torch.long)


def _chunk_path(directory: Path, index: int) -> Path:
    return directory / f"chunk-{index:06d}.safetensors"


def _chunk_rows(directory: Path, index: int) -> int:
    """How many rows a written chunk holds, read from its header (its tensors are not loaded)."""
    with safe_open(str(_chunk_path(directory, index)), framework="pt") as handle:
        return int(handle.get_slice("ids").get_shape()[0])


def _write_chunk(
    directory: Path,
    index: int,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    factors: KroneckerAccumulator | None,
) -> int:
    """Write one chunk atomically: the rows as unit vectors in ``dtype``, their norms and ids; then the token
    factors' sums so far (``factors``), marked with the chunks they cover. Returns the chunks written in all."""
    projected = torch.cat([p for p, _ in batches])
    norms = projected.norm(dim=1)
    unit = projected / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    tensors = {
        "rows": unit.to(dtype).contiguous(),
        "norms": norms.contiguous(),
        "ids": torch.cat([i for _, i in batches]),
    }
    atomic_write(_chunk_path(directory, index), lambda tmp: save_file(tensors, str(tmp)))
    if factors is not None:
        sums, marks = factors.named_tensors(), {"chunks": str(index + 1), "count": str(factors.count)}
        atomic_write(directory / _KRONECKER, lambda tmp: save_file(sums, str(tmp), metadata=marks))
    return index + 1
