"""Pass 2 per batch on the shipped MiniLM or SmolLM2 with LoRA: forward-mode directional derivatives vs per-sample gradients.

    python benchmarks/bench_pass2.py [--model minilm|smollm2] [--n 128] [--seq-len 64] [--batch-size 16] [--rank 8]
                                     [--repeats 3] [--directions 1,2] [--json out.json]

MiniLM (sequence classification, peft LoRA on query/value) reads ``n`` random
word-piece sequences of ``seq-len`` tokens; SmolLM2 (rsLoRA on q_proj/v_proj, the data-selection
learner) reads the first ``n`` shipped tweets as instruction examples (prompt + answer, loss on
the answer), padded per batch.

Ratios of wall time to a plain forward pass (``no_grad`` loss, the model's default attention) over
the same batches, each batch taking its best time over the rounds and the paths alternating batch
by batch, so load from other processes falls on every side of a ratio alike:

- ``gradients``: :class:`hyperinf.gradients.PerSampleGradients` (forward + backward + per-block
  outer products), what pass 2 costs when the gradients are not cached;
- ``jvp xD``: :class:`hyperinf.pass2.DirectionalDerivatives` with D directions (one forward-mode
  pass per direction, attention on the math kernel), what ``pass2="jvp"`` costs;
- ``math forward``: the plain forward on the math attention kernel, to separate the kernel's cost
  from forward-mode AD's.

Forward mode pays off in time only where ``jvp x1`` costs less than ``gradients``.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_engine import as_trained_lora, best_per_batch, random_batches
from torch.nn.attention import SDPBackend, sdpa_kernel

from hyperinf.app.minilm import load_minilm_lora, sequence_classification_loss
from hyperinf.blocks import select_blocks
from hyperinf.gradients import PerSampleGradients
from hyperinf.pass2 import DirectionalDerivatives


def model_and_batches(args: argparse.Namespace) -> tuple[torch.nn.Module, object, list]:
    """The model, its per-example loss and the benchmark's batches."""
    if args.model == "minilm":
        model, tokenizer = load_minilm_lora(num_labels=2, r=args.rank, seed=0, lora_b_std=0.02)
        return (
            model,
            sequence_classification_loss,
            random_batches(tokenizer, args.n, args.seq_len, args.batch_size, seed=1),
        )
    from hyperinf.app.learners import build_learner
    from hyperinf.app.textdata import load_task

    data = load_task("tweets")
    learner = build_learner(args.model, data.label_names, rank=args.rank, max_length=args.seq_len)
    as_trained_lora(learner.model)
    pairs = list(zip(data.texts[: args.n], data.labels[: args.n].tolist()))
    return learner.model, learner.loss, list(learner.loader(pairs, args.batch_size))


def run(args: argparse.Namespace) -> dict:
    model, loss_fn, batches = model_and_batches(args)
    blocks = select_blocks(model, "lora")
    capture = PerSampleGradients(model, loss_fn, blocks)
    derivatives = DirectionalDerivatives(model, loss_fn, blocks)
    gen = torch.Generator().manual_seed(0)
    directions = {d: {b.name: torch.randn(d, *b.shape, generator=gen) for b in blocks} for d in args.directions}

    def forward(batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            loss_fn(model, batch)

    def math_forward(batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            loss_fn(model, batch)

    paths = {"forward": forward, "math forward": math_forward, "gradients": capture}
    paths |= {f"jvp x{d}": (lambda batch, h=h: derivatives(batch, h)) for d, h in directions.items()}
    total = best_per_batch(paths, batches, args.repeats)
    return {
        "args": vars(args),
        "seconds_per_example": {name: t / args.n for name, t in total.items()},
        "ratio_to_forward": {name: t / total["forward"] for name, t in total.items()},
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--directions", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args)
    tokens = f"{args.seq_len} tokens" if args.model == "minilm" else f"at most {args.seq_len} tokens (tweets)"
    print(
        f"{args.model} + LoRA r={args.rank}, {args.n} examples x {tokens}, batch {args.batch_size}, "
        f"{result['torch_threads']} threads; best of {args.repeats} per batch"
    )
    print(f"{'path':>14}{'ms/example':>12}{'x forward':>11}")
    for name, ratio in result["ratio_to_forward"].items():
        print(f"{name:>14}{1000 * result['seconds_per_example'][name]:>12.2f}{ratio:>11.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
