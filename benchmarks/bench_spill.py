"""A second pass over the training gradients: recomputed, or read back from a spill file (hyperinf.spill).

    python benchmarks/bench_spill.py [--models minilm,smollm2] [--n 256,48] [--batch-size 16,8] [--json out.json]

For each model (rsLoRA r = 8, its lora_B drawn as after training so every block has gradient),
on the first ``n`` shipped tweets, with a memory budget of zero, three engines fit and then score
with TracIn (``h = v``: the pass is all that is timed): ``recompute`` (no spill directory: pass 2
computes every per-sample gradient again), ``spill`` (the gradients' own dtype) and ``spill
bfloat16``. A spill's pass 2 is timed twice: ``cold``, after the file was flushed and dropped
from the page cache (``posix_fadvise(DONTNEED)``: what a pool larger than RAM sees), and ``warm``.
Both score passes include the same one-batch validation pass. The dtypes are the commands'
defaults: float32 for MiniLM, float64 for SmolLM2 (``hyperinf select``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_engine import as_trained_lora

from hyperinf import InfluenceEngine
from hyperinf.app.learners import build_learner
from hyperinf.app.textdata import load_task

DTYPES = {"minilm": "float32", "smollm2": "float64"}


def drop_from_page_cache(folder: Path) -> None:
    """Flush every spill file under ``folder`` and ask the kernel to drop its pages: the next read goes to disk."""
    for path in folder.rglob("gradients.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(step) -> tuple[float, object]:
    start = time.perf_counter()
    result = step()
    return time.perf_counter() - start, result


def measure(learner, train, val, dtype: str, folder: Path, spill_dtype: str | None) -> tuple[dict, object]:
    """Fit (recomputing, or spilling to ``folder`` in ``spill_dtype``) and time pass 2: the row and the scores."""
    engine = InfluenceEngine(
        learner.model,
        learner.loss,
        blocks=learner.blocks,
        method="tracin",
        dtype=dtype,
        progress=False,
        cache_bytes=0,
        spill=spill_dtype is not None,
        spill_dir=str(folder),
        spill_dtype=spill_dtype or "full",
    )
    fit_seconds, _ = timed(lambda: engine.fit(train))
    row = {"store": engine.gradient_store, "gradient_bytes": engine.gradient_bytes, "fit_seconds": fit_seconds}
    if spill_dtype:
        row["spill_bytes"] = sum(p.stat().st_size for p in folder.rglob("gradients.bin"))
        drop_from_page_cache(folder)
    row["pass2_seconds"], scores = timed(lambda: engine.score(train, val))
    if spill_dtype:
        row["pass2_warm_seconds"], _ = timed(lambda: engine.score(train, val))
    return row, scores


def run_model(model: str, n: int, batch_size: int) -> dict:
    data = load_task("tweets")
    learner = build_learner(model, data.label_names, rank=8, max_length=128)
    as_trained_lora(learner.model)
    pairs = list(zip(data.texts[:n], data.labels[:n].tolist()))
    train, val = learner.loader(pairs, batch_size), learner.loader(pairs[:batch_size], batch_size)
    rows, reference = {}, None
    for setting, spill_dtype in (("recompute", None), ("spill", "full"), ("spill bfloat16", "bfloat16")):
        with tempfile.TemporaryDirectory() as folder:  # the engine (and its spill file) is gone before it is removed
            row, scores = measure(learner, train, val, DTYPES[model], Path(folder), spill_dtype)
        if reference is None:
            reference = scores
        row["max_relative_difference"] = float(((scores - reference).abs().max() / reference.abs().max()))
        rows[setting] = row
    recompute = rows["recompute"]["pass2_seconds"]
    for row in rows.values():
        row["pass2_speedup"] = recompute / row["pass2_seconds"]
    return {"n": n, "batch_size": batch_size, "dtype": DTYPES[model], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--n", default="256,48", help="examples per model, in the order of --models")
    parser.add_argument("--batch-size", default="16,8", help="batch size per model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    models = args.models.split(",")
    sizes = [int(v) for v in args.n.split(",")]
    batches = [int(v) for v in args.batch_size.split(",")]
    result = {"torch_threads": torch.get_num_threads(), "models": {}}
    for model, n, batch_size in zip(models, sizes, batches):
        result["models"][model] = measured = run_model(model, n, batch_size)
        print(
            f"\n{model} + rsLoRA r=8, {n} tweets, batch {batch_size}, {measured['dtype']}, {result['torch_threads']} threads"
        )
        print(f"{'':>16}{'fit s':>8}{'pass 2 s':>10}{'warm s':>8}{'x faster':>10}{'MiB':>8}{'max rel diff':>14}")
        for setting, row in measured["rows"].items():
            size = row.get("spill_bytes", row["gradient_bytes"]) / 2**20
            warm = f"{row['pass2_warm_seconds']:>8.2f}" if "pass2_warm_seconds" in row else f"{'':>8}"
            print(
                f"{setting:>16}{row['fit_seconds']:>8.2f}{row['pass2_seconds']:>10.2f}{warm}{row['pass2_speedup']:>10.2f}"
                f"{size:>8.0f}{row['max_relative_difference']:>14.2e}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
