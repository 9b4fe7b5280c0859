"""Scoring the whole shipped tweet corpus with MiniLM + LoRA: time and peak memory as the pool grows.

    python benchmarks/bench_large_pool.py [--sizes 2000,8000,0] [--jvp-sizes 0] [--json out.json]

Each size runs in its own process (a clean peak RSS): the first ``n`` tweets of every annotator
confidence (``min_confidence=0``; 0 = all of them), MiniLM with rsLoRA r = 8 (lora_B drawn as
after training, so every block has gradient), float32, batches of 16, 128 tokens at most, 100
other tweets as the validation set. ``fit`` (pass 1: the GFIMs, the per-sample gradients kept
in the default 1 GiB of memory and past it spilled to a temporary folder), then HyperINF's scores
(pass 2, from the spill). For the sizes in ``--jvp-sizes`` the same fit, saved and loaded into an
engine with ``pass2="jvp"``, scores again by forward-mode AD (no gradients kept or read). Peak RSS
is reported beside the RSS once the data and model are loaded, so what the passes add is seen apart
from the data itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mib() -> float:
    """This process's current resident memory."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_size(n: int, jvp: bool) -> dict:
    from bench_engine import as_trained_lora, peak_rss_mib

    from hyperinf import InfluenceEngine
    from hyperinf.app.learners import build_learner
    from hyperinf.app.textdata import load_task

    data = load_task("tweets", min_confidence=0.0)
    n = n or data.labels.numel() - 100
    learner = build_learner("minilm", data.label_names, rank=8, max_length=128)
    as_trained_lora(learner.model)
    pairs = list(zip(data.texts, data.labels.tolist()))
    train, val = learner.loader(pairs[:n], 16), learner.loader(pairs[-100:], 16)
    loaded_mib = rss_mib()
    result = {"n": n, "corpus": data.labels.numel(), "rss_loaded_mib": loaded_mib}
    with tempfile.TemporaryDirectory() as folder:
        engine = InfluenceEngine(learner.model, learner.loss, blocks=learner.blocks, progress=False, spill_dir=folder)
        start = time.perf_counter()
        engine.fit(train)
        result["fit_seconds"] = time.perf_counter() - start
        result["gradient_gib"] = engine.gradient_bytes / 2**30
        result["store"] = engine.gradient_store
        start = time.perf_counter()
        scores = engine.score(train, val)
        result["score_seconds"] = time.perf_counter() - start
        result["pass2"] = engine.pass2_path
        if jvp:
            fit = engine.save_fit(Path(folder) / "fit")
            del engine
            forward = InfluenceEngine(
                learner.model, learner.loss, blocks=learner.blocks, progress=False, pass2="jvp"
            ).load_fit(fit)
            start = time.perf_counter()
            forward_scores = forward.score(train, val)
            result["score_jvp_seconds"] = time.perf_counter() - start
            result["jvp_max_relative_difference"] = float((forward_scores - scores).abs().max() / scores.abs().max())
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="2000,8000,0", help="pool sizes (0: every tweet but the 100 validation ones)"
    )
    parser.add_argument("--jvp-sizes", default="0", help="sizes also scored by forward-mode AD ('' for none)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process: one size
    parser.add_argument("--with-jvp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.with_jvp)))
        return
    jvp_sizes = {int(v) for v in args.jvp_sizes.split(",") if v}
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        command = [sys.executable, __file__, "--one", str(n)] + (["--with-jvp"] if n in jvp_sizes else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        jvp = (
            f", jvp {row['score_jvp_seconds']:.0f} s (max rel diff {row['jvp_max_relative_difference']:.1e})"
            if "score_jvp_seconds" in row
            else ""
        )
        print(
            f"n={row['n']}: gradients {row['gradient_gib']:.2f} GiB ({row['store']}), fit {row['fit_seconds']:.0f} s, "
            f"score {row['score_seconds']:.0f} s ({row['pass2']}){jvp}; RSS loaded {row['rss_loaded_mib']:.0f} MiB, "
            f"peak {row['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
