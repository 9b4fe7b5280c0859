"""Searching a built gradient index exactly and through faiss: time per query, build time, size, recall of the top 10.

    python benchmarks/bench_index_faiss.py INDEX_DIR [--searches "Flat;IVF128,Flat|nprobe=8;HNSW32"] [--json out.json]

``INDEX_DIR`` is an index kept by ``bench_index.py --scale ... --keep INDEX_DIR`` (it holds the projected queries,
``queries.pt``). Per search (a faiss factory string, with ``|parameters`` in faiss's syntax): the faiss index's
build (train + add) time and size on disk, the mean time of a top-10 search one query at a time and for all
queries at once, and recall: the share of the exact search's 10 proponents (and 10 opponents) it also returns.
The exact search (:meth:`GradientIndex.search`) is timed the same way in the same run. Each faiss index is saved
in a temporary folder, so the kept index folder is not changed.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hyperinf.errors import ConfigurationError
from hyperinf.index import GradientIndex
from hyperinf.index_faiss import FaissSearch

TOP = 10


def timed(search, queries: torch.Tensor) -> tuple[object, float, float]:
    """``search``'s result for all queries, and its ms per query one at a time and all at once."""
    start = time.perf_counter()
    for row in queries.split(1):
        search(row)
    single = 1000 * (time.perf_counter() - start) / len(queries)
    start = time.perf_counter()
    result = search(queries)
    batched = 1000 * (time.perf_counter() - start) / len(queries)
    return result, single, batched


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of the share of ``exact``'s rows ``[m, k]`` that ``found`` also lists."""
    return sum(len(set(a.tolist()) & set(b.tolist())) / b.numel() for a, b in zip(found, exact)) / len(exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("--searches", default="Flat;IVF128,Flat|nprobe=8;IVF128,Flat|nprobe=32;HNSW32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    index = GradientIndex.open(args.index)
    queries = torch.load(args.index / "queries.pt")
    exact, single, batched = timed(lambda q: index.search(q, k=TOP), queries)
    rows = [{"search": "exact (torch)", "build_s": 0.0, "mib": 0.0, "ms_single": single, "ms_batched": batched}]
    rows[0] |= {"recall_helpful": 1.0, "recall_harmful": 1.0}
    with tempfile.TemporaryDirectory(dir=args.index.parent) as scratch:
        for spec in args.searches.split(";"):
            factory, _, parameters = spec.partition("|")
            folder = Path(scratch) / "index"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            index.directory = folder  # the faiss index is saved here, not in the kept folder
            start = time.perf_counter()
            searcher = FaissSearch(index, factory, parameters=parameters)
            build = time.perf_counter() - start
            size = sum(p.stat().st_size for p in folder.glob("faiss-*.index")) / 2**20
            try:
                top, single, batched = timed(lambda q: searcher.search(q, k=TOP), queries)
            except ConfigurationError as error:  # an approximate index that finds too few rows: recorded as such
                rows.append({"search": spec, "build_s": build, "mib": size, "error": str(error)})
                continue
            rows.append(
                {
                    "search": spec,
                    "build_s": build,
                    "mib": size,
                    "ms_single": single,
                    "ms_batched": batched,
                    "recall_helpful": recall(top.helpful, exact.helpful),
                    "recall_harmful": recall(top.harmful, exact.harmful),
                }
            )
    result = {
        "index": str(args.index),
        "rows": len(index),
        "dim": index.projection.dim,
        "queries": len(queries),
        "torch_threads": torch.get_num_threads(),
        "searches": rows,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"{len(index)} rows x {index.projection.dim} coordinates, {len(queries)} queries, top-{TOP}")
    print(f"{'search':<28}{'build s':>9}{'MiB':>8}{'ms/q one':>10}{'ms/q all':>10}{'recall +':>10}{'recall -':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['search']:<28}{row['build_s']:>9.2f}{row['mib']:>8.1f}  {row['error']}")
            continue
        print(
            f"{row['search']:<28}{row['build_s']:>9.2f}{row['mib']:>8.1f}{row['ms_single']:>10.2f}"
            f"{row['ms_batched']:>10.2f}{row['recall_helpful']:>10.2f}{row['recall_harmful']:>10.2f}"
        )
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
