"""What projecting only the answer positions onto the vocabulary saves on the shipped SmolLM2.

    python benchmarks/bench_lm_head.py [--n 64] [--batch-size 16] [--repeats 2] [--json out.json]

SmolLM2-135M-Instruct + rsLoRA r = 8 (q_proj, v_proj), the first ``--n`` tweets as instruction
examples. Two ways to get the answer loss of a batch, alternating batch by batch (each batch's best
time over the rounds): ``all positions`` runs the LM head (576 -> 49,152, tied to the embedding) on
every token and then picks the answer-predicting rows; ``answer positions`` is
:func:`hyperinf.app.causal_lm.answer_loss`, which hands the model a position mask
(``logits_to_keep``) so the head sees one row per answer token. Timed as a training step (forward,
backward of the mean loss) and as a forward alone (what option scoring costs), with the losses'
largest difference.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from bench_engine import best_per_batch

from hyperinf.app.causal_lm import IGNORE_INDEX, answer_loss
from hyperinf.app.learners import build_learner
from hyperinf.app.textdata import load_tweets


def all_positions_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The answer loss from every position's logits (what ``answer_loss`` did before the mask)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["target_ids"][:, 1:]
    rows, cols = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    nll = F.cross_entropy(logits[rows, cols], targets[rows, cols], reduction="none")
    return torch.zeros(logits.shape[0], dtype=nll.dtype).index_add(0, rows, nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = load_tweets()
    learner = build_learner("smollm2", data.label_names, rank=8)
    model = learner.model
    batches = list(learner.loader(list(zip(data.texts[: args.n], data.labels[: args.n].tolist())), args.batch_size))
    losses = {"all positions": all_positions_loss, "answer positions": answer_loss}
    with torch.no_grad():
        difference = max(float((all_positions_loss(model, b) - answer_loss(model, b)).abs().max()) for b in batches)

    def step(loss):
        def run(batch):
            loss(model, batch).mean().backward()
            model.zero_grad(set_to_none=True)

        return run

    def forward(loss):
        def run(batch):
            with torch.no_grad():
                loss(model, batch)

        return run

    steps = best_per_batch({name: step(loss) for name, loss in losses.items()}, batches, args.repeats)
    forwards = best_per_batch({name: forward(loss) for name, loss in losses.items()}, batches, args.repeats)
    result = {
        "n": args.n,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "max_loss_difference": difference,
        "step_ms_per_example": {k: 1e3 * v / args.n for k, v in steps.items()},
        "forward_ms_per_example": {k: 1e3 * v / args.n for k, v in forwards.items()},
    }
    for kind in ("step", "forward"):
        times = result[f"{kind}_ms_per_example"]
        print(
            f"{kind:8}: all positions {times['all positions']:.1f} ms/example, answer positions {times['answer positions']:.1f} "
            f"({times['answer positions'] / times['all positions']:.2f}x)"
        )
    print(f"largest loss difference: {difference:.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
