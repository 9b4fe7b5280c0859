"""A small end-to-end run: find flipped labels in scikit-learn's bundled digits with every method.

An MLP is trained on digits whose training labels are 20% flipped; each method scores the
training examples against a clean validation set, and the examples ranked most harmful are
inspected first. No download: the data ships inside scikit-learn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf.app.arguments import InfluenceOptions, engine_options, method_list, option, output_folder, override
from hyperinf.app.report import print_detection_table, print_suspects
from hyperinf.app.textdata import flip_count
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import DataError
from hyperinf.metrics import detection_summary
from hyperinf.results import write_json

DEFAULT_METHODS = ("hyperinf", "hyperinf-fim", "exact", "exact-fim", "datainf", "lissa", "tracin")


@dataclass
class DemoArgs:
    """Settings of the digits demo."""

    out: Path = output_folder("runs/demo")
    n_train: int = option(1000, help="training examples (default: %(default)s)")
    n_val: int = option(200, help="clean validation examples (default: %(default)s)")
    flip_fraction: float = option(0.2, help="share of flipped training labels (default: %(default)s)")
    hidden: int = 32
    epochs: int = option(200, help="full-batch training steps (default: %(default)s)")
    seed: int = option(0, help="seed of split, flips and training (default: %(default)s)")
    methods: tuple[str, ...] = option(
        DEFAULT_METHODS, parse=method_list, help="comma-separated methods (default: all but exact-hessian)"
    )
    progress: bool = override(InfluenceOptions, "progress")


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def load_digits_split(args: DemoArgs) -> dict[str, torch.Tensor]:
    """Standardised digits split into train / val / test, with a seeded share of train labels flipped."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y), generator=generator)
    if args.n_train + args.n_val >= len(y):
        raise DataError(
            f"--n-train {args.n_train} + --n-val {args.n_val} leave no test set: the digits have {len(y)} examples; "
            "lower --n-train / --n-val (n_train / n_val)"
        )
    n_flipped = flip_count(args.flip_fraction, args.n_train)
    train, val, test = (
        order[: args.n_train],
        order[args.n_train : args.n_train + args.n_val],
        order[args.n_train + args.n_val :],
    )
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    flipped = torch.zeros(args.n_train, dtype=torch.bool)
    flipped[torch.randperm(args.n_train, generator=generator)[:n_flipped]] = True
    noisy = y[train].clone()
    shift = torch.randint(1, 10, (int(flipped.sum()),), generator=generator)
    noisy[flipped] = (noisy[flipped] + shift) % 10
    return {
        "x_train": x[train],
        "y_train": noisy,
        "y_true": y[train],
        "flipped": flipped,
        "x_val": x[val],
        "y_val": y[val],
        "x_test": x[test],
        "y_test": y[test],
    }


def train_mlp(data: dict[str, torch.Tensor], args: DemoArgs) -> nn.Module:
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(data["x_train"].shape[1], args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(args.epochs):
        optimizer.zero_grad()
        loss_fn(model, (data["x_train"], data["y_train"])).mean().backward()
        optimizer.step()
    return model.eval()


def run_demo(args: DemoArgs) -> list[dict[str, object]]:
    """Train, score with every method, print and save the detection table; returns its rows."""
    data = load_digits_split(args)
    model = train_mlp(data, args)
    with torch.no_grad():
        accuracy = float((model(data["x_test"]).argmax(1) == data["y_test"]).float().mean())
    print(f"MLP on digits with {args.flip_fraction:.0%} flipped training labels: clean test accuracy {accuracy:.3f}")

    train_loader = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=128)
    val_loader = DataLoader(TensorDataset(data["x_val"], data["y_val"]), batch_size=128)
    engine = InfluenceEngine(model, loss_fn, blocks="linear", method="hyperinf", **engine_options(args))
    engine.fit(train_loader, methods=args.methods)
    scored = engine.score_methods(train_loader, val_loader, args.methods, self_influence="hyperinf")
    scores = {**scored, "self-influence": -scored.self_influence, "training loss": scored.train_loss}
    scores["random"] = torch.rand(args.n_train, generator=torch.Generator().manual_seed(args.seed))

    rows = [
        {
            "method": name,
            **detection_summary(s, data["flipped"]),
            "ihvp_seconds": engine.ihvp_seconds.get(name),
        }
        for name, s in scores.items()
    ]
    print_detection_table(
        rows, "share of flipped labels found after inspecting the top-ranked fraction of the training set"
    )
    with torch.no_grad():
        predicted = model(data["x_train"]).argmax(1)
    print_suspects(scores, args.methods, data["y_train"], predicted, data["flipped"], [str(d) for d in range(10)])
    extra = {f"reference/{k}": v for k, v in scores.items() if k not in args.methods}
    engine.save(args.out, extra={**extra, "labels/flipped": data["flipped"], "labels/predicted": predicted})
    write_json(args.out / "detection.json", {"args": asdict(args), "test_accuracy": accuracy, "rows": rows})
    print(f"results written to {args.out}/")
    return rows
