"""What scoring a data-selection pool costs on the shipped SmolLM2, LoRA and dense last block.

    python benchmarks/bench_select.py [--n 64] [--batch-size 16] [--rank 8] [--repeats 2] [--json out.json]

On real tweets as instruction data (the pool of ``hyperinf experiment select``), per batch and
taking each batch's best time over the rounds, with the paths alternating batch by batch so load
from other processes falls on both sides of the ratio:

- ``forward+backward``: the plain training step's cost (mean answer loss, backward);
- ``per-sample gradients``: what the scoring pass costs per batch (:class:`PerSampleGradients`:
  forward, backward and the per-block outer products), in the study's precision (float64);

and, after one ``fit`` over the pool, each method's time to turn the target gradient ``v`` into
``h = A^{-1} v`` (its preconditioner's build included: ``engine.ihvp_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_engine import best_per_batch, timed

from hyperinf.app.learners import build_learner
from hyperinf.app.textdata import load_tweets
from hyperinf.blocks import select_blocks
from hyperinf.engine import InfluenceEngine
from hyperinf.gradients import PerSampleGradients

METHODS = {
    "lora": ("hyperinf", "exact", "datainf", "lissa", "tracin"),
    "dense": ("hyperinf", "exact", "datainf", "lissa", "tracin", "ekfac"),
}


def run_variant(variant: str, args: argparse.Namespace, pairs: list[tuple[str, int]]) -> dict:
    dense = variant == "dense"
    learner = build_learner("smollm2", ["negative", "positive"], rank=args.rank, dense=dense)
    if not dense:  # peft's zero lora_B would make every lora_A gradient zero: give the adapters a trained-like state
        with torch.no_grad():
            for name, param in learner.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
    batches = [learner.collate(pairs[i : i + args.batch_size]) for i in range(0, len(pairs), args.batch_size)]
    capture = PerSampleGradients(
        learner.model, learner.loss, select_blocks(learner.model, learner.blocks), dtype=torch.float64
    )

    def step(batch: dict[str, torch.Tensor]) -> None:
        learner.model.zero_grad(set_to_none=True)
        learner.loss(learner.model, batch).mean().backward()

    paths = {"forward+backward": step, "per-sample gradients": capture}
    total = best_per_batch(paths, batches, args.repeats)
    learner.model.zero_grad(set_to_none=True)

    methods = METHODS[variant]
    engine = InfluenceEngine(
        learner.model,
        learner.loss,
        blocks=learner.blocks,
        method=methods[0],
        dtype="float64",
        progress=False,
        damping_mode="gfim" if dense else "relative",
        cache_bytes=8 << 30,
    )
    loader = learner.loader(pairs, args.batch_size)
    fit_seconds = timed(lambda: engine.fit(loader, methods=list(methods)))[0]
    engine.score_methods(loader, learner.loader(pairs[: args.batch_size], args.batch_size), list(methods))
    return {
        "blocks": len(engine.blocks),
        "params": sum(b.num_params for b in engine.blocks),
        "seconds_per_example": {name: t / len(pairs) for name, t in total.items()},
        "ratio_to_forward_backward": {name: t / total["forward+backward"] for name, t in total.items()},
        "fit_seconds_per_example": fit_seconds / len(pairs),
        "ihvp_seconds": dict(engine.ihvp_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="lora,dense")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = load_tweets()
    pairs = list(zip(data.texts[: args.n], data.labels[: args.n].tolist()))
    result = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    for variant in args.variants.split(","):
        r = result[variant] = run_variant(variant, args, pairs)
        print(
            f"\nSmolLM2-135M, {variant} ({r['blocks']} blocks, {r['params']:,} parameters), {args.n} tweets, batch "
            f"{args.batch_size}, {result['torch_threads']} threads; best of {args.repeats} per batch"
        )
        for name, ratio in r["ratio_to_forward_backward"].items():
            print(
                f"  {name:<22}{1000 * r['seconds_per_example'][name]:>9.1f} ms/example{ratio:>7.2f} x forward+backward"
            )
        print(f"  {'fit (pass 1)':<22}{1000 * r['fit_seconds_per_example']:>9.1f} ms/example")
        print("  h = A^-1 v (build included): " + ", ".join(f"{m} {s:.2f} s" for m, s in r["ihvp_seconds"].items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
