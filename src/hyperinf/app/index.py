"""``hyperinf index build`` / ``hyperinf index query``: index a model's training rows once, then answer each query
with one gradient and one matrix product (:mod:`hyperinf.index`).

``build`` reads the same model, adapter and rows as ``hyperinf score`` and, in one pass over the rows, writes the
index into ``--out`` with the rows' texts (``rows.jsonl``) and its settings (``arguments.json``); built with
``--method kfac`` or ``ekfac`` it also sums the projected layers' Kronecker factors. ``query`` loads the model and
options the index was built with, preconditions each query in the projected space with ``--method`` (default: the
build's) and ``--damping``, and writes ``query.jsonl`` in ``hyperinf score``'s ``top_k.jsonl`` layout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hyperinf.app.arguments import (
    InfluenceOptions,
    add_options,
    from_namespace,
    method_name,
    option,
    output_folder,
    override,
)
from hyperinf.app.score import (
    QUERY_HELP,
    SIGN,
    ModelRowsArgs,
    attributed_rows,
    block_records,
    check_attributed,
    check_model_rows,
    data_record,
    load_model_of,
    loader,
    make_engine,
    read_rows,
    top_k_records,
    train_key,
)
from hyperinf.curvature import DampingMode
from hyperinf.errors import DataError
from hyperinf.index import STORAGE, GradientIndex, check_index_method, index_methods, needs_kronecker, saved_settings
from hyperinf.index_faiss import FaissSearch
from hyperinf.results import write_json, write_jsonl


@dataclass
class IndexBuildArgs(ModelRowsArgs):
    """Every setting of ``hyperinf index build``."""

    dim: int = option(
        8192,
        help="projected coordinates per training row, split over the blocks by their sizes; 0 stores the "
        "gradients whole (exact scores, largest index) (default: %(default)s)",
    )
    seed: int = option(0, help="seed of the random projection (default: %(default)s)")
    storage: str = option("float16", choices=tuple(STORAGE), help="precision of the stored rows (default: %(default)s)")
    method: str = option(
        "hyperinf",
        parse=method_name,
        help=f"the queries' default preconditioner, one of {', '.join(index_methods())}; kfac and ekfac need the "
        "projected layers' Kronecker factors, which the build then sums (any GFIM method can query any index) "
        "(default: %(default)s)",
    )
    out: Path = override(
        ModelRowsArgs, "out", default=Path("runs/index"), help="the index folder (default: %(default)s)"
    )


@dataclass
class IndexQueryArgs:
    """Every setting of ``hyperinf index query``."""

    index: Path | None = option(None, parse=Path, help="an index folder written by hyperinf index build")
    method: str | None = option(
        None,
        parse=method_name,
        help=f"the preconditioner of the projected gradients: one of {', '.join(index_methods())} (default: the "
        "build's --method)",
    )
    damping: float = override(InfluenceOptions, "damping")
    damping_mode: DampingMode = override(
        InfluenceOptions, "damping_mode", default="relative", help="how the damping scales (default: %(default)s)"
    )
    target: Path | None = option(None, parse=Path, help="the rows whose loss is attributed (the index's formats)")
    query: list[str] = field(default_factory=list)  # --query, repeatable: added by add_arguments
    k: int = option(10, flag="-k", help="proponents and opponents per target row or query (default: %(default)s)")
    normalize: bool = option(
        False,
        help="rank by minus the cosine of the training row's projected gradient and the query's preconditioned one "
        "(with --method tracin, of the two projected gradients: LESS's ranking) instead of the influence",
    )
    faiss: str | None = option(
        None,
        parse=str,
        help="search with a faiss inner-product index of this factory string (e.g. Flat, IVF1024,Flat, HNSW32; "
        "built once and saved in the index folder) instead of the exact search; needs hyperinf[faiss]",
    )
    faiss_parameters: str = option(
        "", parse=str, help="with --faiss: search-time parameters in faiss's syntax, e.g. nprobe=16"
    )
    out: Path = output_folder("runs/index-query")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf index build`` and ``query`` subcommands (argparse)."""
    actions = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="index every --train row's randomly projected gradient (once)",
        description="Load a model saved with save_pretrained (and a peft adapter) and store each --train row's "
        "gradient, randomly projected to --dim coordinates, with the curvature of the projected gradients, in --out.",
    )
    add_options(build, IndexBuildArgs, skip=("damping", "damping_mode", "cache_gib"))  # chosen per query; no fit
    build.set_defaults(run=main_build)
    query = actions.add_parser(
        "query",
        help="the indexed rows that most helped and hurt each --target row or --query text",
        description="Score every indexed row against each --target row (or --query text) with one gradient and one "
        "matrix product, and write each one's k proponents and opponents to --out/query.jsonl.",
    )
    add_options(query, IndexQueryArgs)
    query.add_argument("--query", action="append", default=[], help=QUERY_HELP)
    query.set_defaults(run=main_query)


def main_build(ns: argparse.Namespace) -> int:
    run_build(from_namespace(IndexBuildArgs, ns))
    return 0


def main_query(ns: argparse.Namespace) -> int:
    run_query(from_namespace(IndexQueryArgs, ns))
    return 0


def run_build(args: IndexBuildArgs) -> GradientIndex:
    """The ``hyperinf index build`` job: load, index (one pass over the rows), write; returns the index."""
    check_model_rows(args)
    if args.dim < 0:
        raise DataError(f"--dim {args.dim}: must be at least 0 (0 stores the gradients whole)")
    check_index_method(args.method)
    earlier = saved_settings(args.out)
    if earlier is not None:
        asked = {"dim": args.dim, "seed": args.seed, "storage": args.storage}
        differ = [f"--{key} {earlier[key]}" for key, value in asked.items() if earlier.get(key) != value]
        if earlier["kronecker"] != needs_kronecker(args.method):
            differ.append("Kronecker factors" if earlier["kronecker"] else "no Kronecker factors")
        if differ:
            raise DataError(
                f"{args.out} holds an index built with {', '.join(differ)}: choose another --out, or delete it to "
                "build again"
            )
    assert args.train is not None
    started = time.perf_counter()
    loaded = load_model_of(args)
    train, _ = read_rows(args, loaded, args.train)
    engine = make_engine(args, loaded, ["tracin"])  # no curvature of the full blocks is needed
    plan = engine.gradient_plan(len(train.examples))
    for line in (train.summary(str(args.train)), plan.describe()[0]):
        print(line)
    index = GradientIndex.build(
        engine,
        loader(train.examples, loaded.tokenizer, args.batch_size),
        args.out,
        dim=args.dim,
        seed=args.seed,
        storage=args.storage,
        row_ids=train.rows,
        source=train_key(args, train),
        kronecker=needs_kronecker(args.method),
    )
    write_jsonl(args.out / "rows.jsonl", [{"row": row, "text": train.texts[row]} for row in train.rows])
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in args.out.glob("chunk-*.safetensors"))
    write_json(
        args.out / "arguments.json",
        {
            "args": asdict(args),
            "model_kind": loaded.kind,
            "train": data_record(train),
            "blocks": block_records(engine),
            "dim": index.projection.dim,
            "index_bytes": size,
            "gradient_bytes": plan.bytes,
            "seconds": seconds,
        },
    )
    print(
        f"indexed {len(index)} training rows x {index.projection.dim} coordinates ({args.storage}): {size / 2**20:.1f} "
        f"MiB on disk (their whole gradients: {plan.bytes / 2**20:.1f} MiB) in {seconds:.0f} s; written to {args.out}/"
    )
    return index


def built_args(folder: Path) -> IndexBuildArgs:
    """The settings an index was built with (its arguments.json), so a query loads the same model and options."""
    path = folder / "arguments.json"
    if not path.is_file():
        raise DataError(f"{folder} holds no arguments.json: pass a folder written by hyperinf index build")
    saved = json.loads(path.read_text())["args"]
    values: dict[str, Any] = {}
    for f in fields(IndexBuildArgs):
        if f.name not in saved:  # a setting newer than the index: its default
            continue
        value, parse = saved[f.name], f.metadata.get("parse")
        values[f.name] = (
            parse(value) if parse is not None and isinstance(value, str) else value
        )  # JSON keeps Paths as text
    return IndexBuildArgs(**(values | {"out": folder}))


def run_query(args: IndexQueryArgs) -> dict[str, Any]:
    """The ``hyperinf index query`` job: per target row or query, its proponents and opponents among the indexed rows."""
    if args.index is None:
        raise DataError("--index is required: a folder written by hyperinf index build")
    check_attributed(args.target, args.query, args.k)
    if args.faiss_parameters and args.faiss is None:
        raise DataError("--faiss-parameters applies to a faiss search: give --faiss FACTORY too")
    index = GradientIndex.open(args.index)
    built = replace(built_args(args.index), damping=args.damping, damping_mode=args.damping_mode)
    method = args.method or built.method
    index.check_method(method)
    searcher = None
    if args.faiss is not None:  # built (or read) before the timed search
        searcher = FaissSearch(index, args.faiss, normalize=args.normalize, parameters=args.faiss_parameters)
    loaded = load_model_of(built)
    target, name = attributed_rows(built, loaded, args.target, args.query)
    print(target.summary(name))
    engine = make_engine(built, loaded, ["tracin"])  # the index holds the projected curvature; the engine none
    started = time.perf_counter()
    queries = index.project_queries(engine, loader(target.examples, loaded.tokenizer, built.batch_size), method=method)
    gradient_seconds = time.perf_counter() - started
    k = min(args.k, len(index))
    top = searcher.search(queries, k=k) if searcher else index.search(queries, k=k, normalize=args.normalize)
    search_seconds = time.perf_counter() - started - gradient_seconds
    texts = {
        record["row"]: record["text"]
        for record in map(json.loads, (args.index / "rows.jsonl").read_text(encoding="utf-8").splitlines())
    }
    targets = [(row, target.texts[row]) for row in target.rows]
    write_jsonl(args.out / "query.jsonl", top_k_records(top, index.ids.tolist(), texts, targets))
    per_query_ms = 1000 * search_seconds / max(1, len(targets))
    write_json(
        args.out / "arguments.json",
        {
            "args": asdict(args) | {"method": method},
            "sign": "minus the cosine of P g_k and A_P^-1 P q" if args.normalize else SIGN,
            "index": {"rows": len(index), "dim": index.projection.dim},
            "target": data_record(target),
            "seconds": {"query_gradients": gradient_seconds, "search": search_seconds},
            "search_ms_per_query": per_query_ms,
        },
    )
    print(
        f"answered {len(targets)} queries from {len(index)} indexed rows: their gradients took {gradient_seconds:.2f} s, "
        f"the search {per_query_ms:.1f} ms per query; written to {args.out}/query.jsonl"
    )
    return {"top_k": top, "index": index}
