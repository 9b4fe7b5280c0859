"""Scale-out of fit + score across torch.distributed processes, on the shipped MiniLM with LoRA.

    python benchmarks/bench_distributed.py [--processes 1,2] [--n-train 512] [--n-val 64]
                                           [--seq-len 64] [--repeats 3] [--json out.json]

Each configuration is a real ``torchrun --standalone`` launch (backend gloo) of this script in
``--worker`` mode: every process loads the model, takes its contiguous shard of the same random
data (``hyperinf.distributed.shard``), and the timed region is ``InfluenceEngine(distributed=True)``
``fit`` + ``score`` between two barriers (model loading excluded). The CPU cores are split evenly
between the processes (``torch.set_num_threads``), so the ratio ``t(1) / t(N)`` measures what
sharding the data costs or saves on the same machine; across machines each process would bring
its own cores. Configurations alternate within each repeat so that load from other processes
falls on all alike; the best of ``--repeats`` is reported for each, and the ratio of bests.
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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_engine import random_batches  # noqa: E402  (benchmarks/ is on sys.path for its scripts)
from torch.utils.data import DataLoader  # noqa: E402

from hyperinf import InfluenceEngine  # noqa: E402
from hyperinf.app.minilm import load_minilm_lora, sequence_classification_loss  # noqa: E402
from hyperinf.distributed import shard  # noqa: E402


def stack(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def worker(args: argparse.Namespace) -> None:
    """One process of a torchrun launch: time distributed fit + score on this process's shard."""
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, args.cores // dist.get_world_size()))
    model, tokenizer = load_minilm_lora(num_labels=2, r=8, seed=0, lora_b_std=0.02)
    train = random_batches(tokenizer, args.n_train, args.seq_len, batch_size=1, seed=1)
    val = random_batches(tokenizer, args.n_val, args.seq_len, batch_size=1, seed=2)
    train_loader = DataLoader(shard(train), batch_size=16, collate_fn=stack)
    val_loader = DataLoader(shard(val), batch_size=16, collate_fn=stack)
    engine = InfluenceEngine(model, sequence_classification_loss, blocks="lora", distributed=True, progress=False)
    dist.barrier()
    start = time.perf_counter()
    engine.fit(train_loader)
    engine.score(train_loader, val_loader)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps({"seconds": elapsed}))
    dist.destroy_process_group()


def launch(processes: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            __file__,
            "--worker",
            "--result",
            str(result),
            "--cores",
            str(args.cores),
            "--n-train",
            str(args.n_train),
            "--n-val",
            str(args.n_val),
            "--seq-len",
            str(args.seq_len),
        ]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(result.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="process counts to compare (default: 1,2)")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores split among the processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    counts = [int(p) for p in args.processes.split(",")]
    times: dict[int, list[float]] = {p: [] for p in counts}
    for repeat in range(args.repeats):
        for p in counts if repeat % 2 == 0 else reversed(counts):
            times[p].append(launch(p, args))
            print(f"repeat {repeat}: {p} process(es): {times[p][-1]:.1f} s", flush=True)
    best = {p: min(t) for p, t in times.items()}
    report = {
        "n_train": args.n_train,
        "n_val": args.n_val,
        "seq_len": args.seq_len,
        "cores": args.cores,
        "seconds": times,
        "best": best,
        "speedup_vs_1": {p: best[counts[0]] / best[p] for p in counts},
        "torch": torch.__version__,
    }
    for p in counts:
        print(f"{p} process(es): best {best[p]:.1f} s, speed-up x{report['speedup_vs_1'][p]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
