"""The gradient index (hyperinf.index) against the unprojected scores, by --dim: accuracy, size, build and query time.

    python benchmarks/bench_index.py [--models mnist,minilm,smollm2] [--n 1000,1000,200] [--queries 50]
                                     [--dims 256,1024,4096,16384] [--json out.json]
    python benchmarks/bench_index.py --scale minilm [--n 22789] [--dims 8192] [--queries 50] [--epoch-rows M]
                                     [--keep DIR]

``--scale MODEL`` measures size and speed only, on MiniLM or SmolLM2 with rsLoRA r = 8 (``lora_B`` drawn as
after training) over the first ``n`` tweets of all 22,789 (no confidence filter): one plain training epoch
(AdamW), the index build from an unfitted engine (its gradient pass included), the index and whole-gradient
sizes, the time of the queries' gradients and of a top-10 search over every row per query, peak RSS. With
``--epoch-rows M`` the epoch is timed over the first ``M`` of the ``n`` rows and scaled by ``n / M`` (an epoch's
cost is linear in its rows), for runs where a whole epoch would cost as much as the build. ``--keep DIR`` (a new
folder) builds the index there and keeps it, with the projected queries (``queries.pt``), for later searches.

Per model, an engine (HyperINF, the commands' dtypes: float32 for the MLP and MiniLM, float64 for SmolLM2) is
fitted on ``n`` training rows and the unprojected pairwise scores against ``--queries`` held-out rows are the
reference (``engine.pairwise``). Then, per ``--dim``, an index is built (float16 rows, seed 0) from the kept
gradients, and its scores are compared with the reference per query: Spearman over the training rows (mean over
queries) and the overlap of the 10 most helpful rows. Timed in the same run: one plain training epoch over the
same rows (AdamW, forward + backward + step, on a copy of the model), the fit (pass 1), each build, the query
gradients, and the search for a top-10 per query (one query at a time, the mean). Peak RSS at the end.

The models: ``mnist``, the MLP 784 -> 64 -> 10 of ``hyperinf experiment lds`` trained on the first ``n`` of its
split (30 epochs, cached); ``minilm``, the lds tweets setting (rsLoRA r = 8 fine-tuned 3 epochs, cached);
``smollm2``, SmolLM2-135M-Instruct with rsLoRA r = 8 whose ``lora_B`` is drawn as after training (not trained
here), tweets as instruction data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_engine import as_trained_lora

from hyperinf import InfluenceEngine
from hyperinf.app.learners import build_learner
from hyperinf.app.textdata import load_task
from hyperinf.index import GradientIndex
from hyperinf.metrics import spearman
from hyperinf.paper.lds import LdsArgs
from hyperinf.paper.retraining import SETTINGS, Trainer

TOP = 10
DTYPES = {"minilm": "float32", "smollm2": "float64"}  # the commands' gradient precision per model


def setting_parts(model: str, n: int, queries: int, batch_size: int):
    """``(model, loss, blocks, train loader, query loader, dtype)`` for one of the three models."""
    if model in ("mnist", "minilm"):
        args = LdsArgs(setting="mnist" if model == "mnist" else "tweets", n_train=n, n_query=queries, progress=False)
        setting = SETTINGS[args.setting](args)
        net = Trainer(args, setting).model(torch.arange(n), args.seed)
        loader = lambda rows: torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=setting.collate)  # noqa: E731
        return net, setting.loss, setting.blocks, loader(setting.train), loader(setting.query), "float32"
    data = load_task("tweets")
    learner = build_learner("smollm2", data.label_names, rank=8, max_length=128)
    as_trained_lora(learner.model)
    pairs = list(zip(data.texts[: n + queries], data.labels[: n + queries].tolist()))
    train, query = learner.loader(pairs[:n], batch_size), learner.loader(pairs[n:], batch_size)
    return learner.model, learner.loss, learner.blocks, train, query, "float64"


def training_epoch_seconds(model, loss, loader) -> float:
    """One epoch of AdamW over ``loader`` on a copy of ``model`` (its trainable parameters)."""
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for batch in loader:
        optimizer.zero_grad()
        loss(trained, batch).mean().backward()
        optimizer.step()
    return time.perf_counter() - start


def agreement(projected: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Mean over queries of Spearman over training rows, and of the overlap of the ``TOP`` most helpful rows."""
    rho = spearman(projected.T.double(), exact.T.double())
    top = min(TOP, exact.shape[0])
    mine = projected.topk(top, dim=0, largest=False).indices.T
    theirs = exact.topk(top, dim=0, largest=False).indices.T
    overlap = [len(set(a.tolist()) & set(b.tolist())) / top for a, b in zip(mine, theirs)]
    return {"spearman": float(rho.nanmean()), "top10_overlap": sum(overlap) / len(overlap)}


def run_model(model: str, n: int, queries: int, dims: list[int], batch_size: int) -> dict:
    net, loss, blocks, train, query, dtype = setting_parts(model, n, queries, batch_size)
    epoch = training_epoch_seconds(net, loss, train)
    engine = InfluenceEngine(net, loss, blocks=blocks, dtype=dtype, progress=False, cache_bytes=8 * 2**30)
    start = time.perf_counter()
    engine.fit(train)
    fit = time.perf_counter() - start
    exact = engine.pairwise(train, query)
    rows = []
    for dim in dims:
        index, projected, row = timed_index(engine, train, query, dim)
        scores = torch.cat(list(index.scores(projected)))
        rows.append({"asked": dim, **agreement(scores, exact), **row})
    return {
        "n": n,
        "queries": queries,
        "dtype": dtype,
        "parameters": sum(b.num_params for b in engine.blocks),
        "gradient_mib": engine.gradient_bytes / 2**20,
        "epoch_seconds": epoch,
        "fit_seconds": fit,
        "rows": rows,
    }


def run_scale(
    model: str, n: int, queries: int, dim: int, batch_size: int, epoch_rows: int | None, keep: Path | None
) -> dict:
    """Size and speed of an index of ``n`` tweets (see the module docstring)."""
    if keep is not None and keep.exists():
        raise SystemExit(f"--keep {keep} exists: give a new folder, so the build is timed whole")
    data = load_task("tweets", min_confidence=0.0)
    learner = build_learner(model, data.label_names, rank=8, max_length=64)
    as_trained_lora(learner.model)
    if n + queries > len(data.texts):
        raise SystemExit(f"--n {n} + --queries {queries} exceed the {len(data.texts)} tweets: lower --n")
    pairs = list(zip(data.texts[: n + queries], data.labels[: n + queries].tolist()))
    train, query = learner.loader(pairs[:n], batch_size), learner.loader(pairs[n:], batch_size)
    timed_rows = min(epoch_rows or n, n)
    epoch_part = training_epoch_seconds(learner.model, learner.loss, learner.loader(pairs[:timed_rows], batch_size))
    epoch = epoch_part * n / timed_rows
    engine = InfluenceEngine(learner.model, learner.loss, blocks=learner.blocks, dtype=DTYPES[model], progress=False)
    index, projected, row = timed_index(engine, train, query, dim, keep)
    if keep is not None:
        torch.save(projected, keep / "queries.pt")
    return {
        "n": len(index),
        "parameters": sum(b.num_params for b in engine.blocks),
        "gradient_mib": engine.gradient_plan(n).bytes / 2**20,
        "epoch_rows_timed": timed_rows,
        "epoch_seconds_timed": epoch_part,
        "epoch_seconds": epoch,
        **row,
        "build_per_epoch": row["build_seconds"] / epoch,
    }


def timed_index(engine, train, query, dim: int, keep: Path | None = None) -> tuple[GradientIndex, torch.Tensor, dict]:
    """Build an index of ``train`` (in a temporary folder, or ``keep``), project ``query``, and search a top-10 per
    query: the index, the projected queries, and the sizes and times."""
    with contextlib.nullcontext(str(keep)) if keep is not None else tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        index = GradientIndex.build(engine, train, folder, dim=dim)
        build = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(folder).glob("chunk-*.safetensors"))
    start = time.perf_counter()
    projected = index.project_queries(engine, query)
    gradients = time.perf_counter() - start
    start = time.perf_counter()
    for row in projected.split(1):
        index.search(row, k=TOP)
    search_ms = 1000 * (time.perf_counter() - start) / len(projected)
    return (
        index,
        projected,
        {
            "dim": index.projection.dim,
            "index_mib": size / 2**20,
            "build_seconds": build,
            "query_gradient_ms": 1000 * gradients / len(projected),
            "search_ms_per_query": search_ms,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,minilm,smollm2")
    parser.add_argument("--n", default="1000,1000,200", help="training rows per model, in the order of --models")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--dims", default="256,1024,4096,16384")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--scale", choices=tuple(DTYPES), default=None)
    parser.add_argument("--epoch-rows", type=int, default=None, help="--scale: time the epoch over this many rows")
    parser.add_argument("--keep", type=Path, default=None, help="--scale: build the index in this new folder, kept")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dims = [int(v) for v in args.dims.split(",")]
    result = {"torch_threads": torch.get_num_threads(), "models": {}}
    if args.scale:
        result["scale"] = row = run_scale(
            args.scale, int(args.n.split(",")[0]), args.queries, dims[0], args.batch_size, args.epoch_rows, args.keep
        )
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(row, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    for model, n in zip(args.models.split(","), (int(v) for v in args.n.split(","))):
        result["models"][model] = m = run_model(model, n, args.queries, dims, args.batch_size)
        print(
            f"\n{model}: {n} rows x {m['parameters']:,} parameters ({m['dtype']}, gradients {m['gradient_mib']:.0f} MiB),"
            f" {args.queries} queries, {result['torch_threads']} threads; one training epoch {m['epoch_seconds']:.1f} s,"
            f" fit {m['fit_seconds']:.1f} s"
        )
        print(f"{'dim':>7}{'spearman':>10}{'top-10':>8}{'MiB':>8}{'build s':>9}{'x epoch':>9}{'ms/query':>10}")
        for row in m["rows"]:
            ratio = (m["fit_seconds"] + row["build_seconds"]) / m["epoch_seconds"]
            print(
                f"{row['dim']:>7}{row['spearman']:>10.3f}{row['top10_overlap']:>8.2f}{row['index_mib']:>8.1f}"
                f"{row['build_seconds']:>9.2f}{ratio:>9.2f}{row['search_ms_per_query']:>10.2f}"
            )
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {result['peak_rss_mib']:.0f} MiB; 'x epoch' = (fit + build) / one training epoch")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
