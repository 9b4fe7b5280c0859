"""What batching test texts by length saves when SmolLM2 scores answer options.

    python benchmarks/bench_option_scoring.py [--n 200] [--batch-size 16] [--repeats 2]

The selection study's test set (``--n`` tweets held out by ``hyperinf experiment select``'s split,
seed 0) scored by :func:`hyperinf.app.causal_lm.option_log_likelihoods` on SmolLM2-135M-Instruct:
``in given order`` calls it one batch at a time (each batch padded to its longest text, as before
the texts were sorted); ``by length`` is one call, which batches the texts in order of length.
Alternating rounds, best time of each; prints seconds, padded tokens and the largest difference
of the scores and how many predicted answers differ.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hyperinf.app.causal_lm import (
    default_template,
    load_smollm2,
    option_log_likelihoods,
)
from hyperinf.paper.select_study import StudyArgs, study_split

NAMES = ["negative", "positive"]


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    ns = parser.parse_args()
    texts = list(study_split(StudyArgs(n_test=ns.n)).test.texts)
    model, tokenizer = load_smollm2()
    template = default_template(NAMES, "tweet")
    b = ns.batch_size

    def in_order() -> torch.Tensor:
        return torch.cat(
            [
                option_log_likelihoods(model, tokenizer, texts[i : i + b], NAMES, template, batch_size=b)
                for i in range(0, len(texts), b)
            ]
        )

    def by_length() -> torch.Tensor:
        return option_log_likelihoods(model, tokenizer, texts, NAMES, template, batch_size=b)

    best = {"in given order": float("inf"), "by length": float("inf")}
    scores = {}
    for _ in range(ns.repeats):
        for name, run in (("in given order", in_order), ("by length", by_length)):
            start = time.perf_counter()
            scores[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    lengths = [
        len(ids) for ids in tokenizer([template.prompt(t) for t in texts], add_special_tokens=False)["input_ids"]
    ]
    tokens = {"in given order": padded_tokens(lengths, b), "by length": padded_tokens(sorted(lengths), b)}
    print(f"{len(texts)} tweets, batches of {b}, {torch.get_num_threads()} thread(s), best of {ns.repeats}")
    for name in best:
        print(f"  {name:15s} {best[name]:7.1f} s  {tokens[name]:6d} prompt tokens with padding")
    print(
        f"  ratio {best['by length'] / best['in given order']:.2f}; "
        f"largest score difference {float((scores['by length'] - scores['in given order']).abs().max()):.2e}; "
        f"predictions that differ: {int((scores['by length'].argmax(1) != scores['in given order'].argmax(1)).sum())}"
    )


if __name__ == "__main__":
    main()
