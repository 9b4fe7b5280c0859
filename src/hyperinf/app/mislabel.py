"""Mislabeled-data detection on a fine-tuned transformer (paper Sec. 5.1, Table 2, Figs. 2-5).

A share of the training labels is flipped; the shipped MiniLM encoder is fine-tuned with rsLoRA
on the noisy data (the trained adapter is cached under a key of every training setting); every
method scores the training examples against a clean validation set, and the examples ranked most
harmful are inspected first. The references a practitioner would try first — each example's own
training loss, and self-influence — are scored beside the methods.
"""

from __future__ import annotations

import argparse
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from hyperinf.app import textdata
from hyperinf.app.arguments import (
    DataOptions,
    InfluenceOptions,
    TrainingOptions,
    add_options,
    engine_options,
    from_namespace,
    int_list,
    key_settings,
    method_list,
    option,
    output_folder,
    override,
)
from hyperinf.app.finetune import Schedule, train_or_load, trained_path, training_key
from hyperinf.app.learners import classifier
from hyperinf.app.minilm import (
    classifier_logits,
    collate_fn,
    sequence_classification_loss,
)
from hyperinf.app.report import (
    new_figure,
    print_detection_table,
    print_suspects,
    save_figure,
)
from hyperinf.app.textdata import MislabelSplit, TextDataset, flip_count, report_skipped, split_and_flip
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import DataError
from hyperinf.metrics import detection_curve, detection_summary
from hyperinf.results import atomic_write, remove_if_empty, write_json

DEFAULT_METHODS = ("hyperinf", "kfac", "ekfac", "exact", "datainf", "lissa", "tracin")
FIM_METHODS = ("hyperinf-fim", "exact-fim")
REFERENCES = ("self-influence", "training loss", "random")
SELF_INFLUENCE = "hyperinf"  # the method whose self-influence is the "self-influence" reference
CHECKPOINT_EVERY = 50  # batches between checkpoints of the influence passes (a few seconds of work on MiniLM)


@dataclass
class MislabelArgs(InfluenceOptions, TrainingOptions, DataOptions):
    """Every setting of a mislabel-detection run (those marked ``key`` form the adapter's cache key)."""

    # In this command's key since its first cached adapters (the examples, hashed too, follow the columns).
    text_column: str = override(DataOptions, "text_column", key="training")
    label_column: str = override(DataOptions, "label_column", key="training")
    n_train: int = option(2000, key="training", help="training examples (default: %(default)s)")
    n_val: int = option(200, help="clean validation examples (default: %(default)s)")
    n_test: int = option(1000, help="clean test examples (default: %(default)s)")
    balanced: bool = option(
        True,
        key="training",
        flag="--unbalanced",
        help="draw examples at the data's class frequencies instead of equally per class",
    )
    flip_fraction: float = option(0.2, key="training", help="share of flipped training labels (default: %(default)s)")
    last_layer: bool = option(
        False, key="training", help="tune and attribute the last encoder layer + head instead of LoRA"
    )
    methods: tuple[str, ...] = option(
        DEFAULT_METHODS, parse=method_list, help="comma-separated methods (default: %(default)s)"
    )
    fim: bool = option(False, help="add hyperinf-fim and exact-fim when the blocks are small enough")
    fim_max_params: int = option(4096, engine=True)
    adapter: Path | None = option(
        None,
        parse=Path,
        help="explain only: a peft adapter trained on --model (a folder), with its head; the model is explained as "
        "given and nothing is trained",
    )
    out: Path = output_folder("runs/mislabel")

    @property
    def dense_blocks(self) -> bool:
        return self.last_layer

    def training_key(self, split: MislabelSplit) -> str:
        """Hash of everything that determines the trained weights, the training data included."""
        return training_key(key_settings(self), zip(split.train.texts, split.train.labels.tolist()))


def load_task(args: MislabelArgs) -> TextDataset:
    """The run's data (:func:`hyperinf.app.textdata.load_task` with the run's options)."""
    return textdata.load_task(args.task, args.min_confidence, args.text_column, args.label_column)


def build_model(
    args: MislabelArgs, num_labels: int, label_names: list[str] | None = None
) -> tuple[nn.Module, Any, list[str] | str]:
    """The classifier, its tokenizer and the blocks to attribute (LoRA, or the last layer + head); with
    ``--adapter`` the model is used as given, so its head must name ``label_names`` in their order."""
    return classifier(
        args.model,
        num_labels,
        rank=args.rank,
        seed=args.seed,
        dense=args.last_layer,
        adapter=args.adapter,
        given_labels=label_names if args.adapter is not None else None,
    )


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    """The label the classifier predicts for every example of ``loader``, in loader order."""
    return torch.cat([classifier_logits(model, batch).argmax(-1) for batch in loader])


@dataclass
class TrainedSeed:
    """One seed's split and its fine-tuned model, with what scoring needs: blocks and a loader maker."""

    split: MislabelSplit
    model: nn.Module
    blocks: list[str] | str
    loader: Callable[[TextDataset], DataLoader]
    training: dict[str, Any]


def trained_seed(args: MislabelArgs, data: TextDataset) -> TrainedSeed:
    """Split and flip the data for ``args.seed``, then train the model on it (or load it from the cache)."""
    if args.n_test < 1:
        raise DataError(f"--n-test / n_test must be at least 1 (the clean test accuracy), got {args.n_test}")
    split = split_and_flip(
        data,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        flip_fraction=args.flip_fraction,
        balanced=args.balanced,
        seed=args.seed,
    )
    model, tokenizer, blocks = build_model(args, len(data.label_names), data.label_names)
    collate = collate_fn(tokenizer, args.max_length)

    def loader_fn(ds: TextDataset) -> DataLoader:
        return DataLoader(list(zip(ds.texts, ds.labels.tolist())), batch_size=args.batch_size, collate_fn=collate)

    if args.adapter is not None:  # a model trained elsewhere: used as given
        return TrainedSeed(split, model, blocks, loader_fn, {"cached": False, "seconds": 0.0, "as_given": True})
    examples = list(zip(split.train.texts, split.train.labels.tolist()))
    schedule = Schedule(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    path = trained_path(args.cache_dir, args.training_key(split))
    training = train_or_load(
        model, sequence_classification_loss, examples, collate, schedule, path, progress=args.progress
    )
    return TrainedSeed(split, model, blocks, loader_fn, training)


def influence_engine(args: MislabelArgs, seed: TrainedSeed) -> InfluenceEngine:
    """The engine over the seed's attributed blocks, with the run's damping and precision."""
    return InfluenceEngine(
        seed.model,
        sequence_classification_loss,
        blocks=seed.blocks,
        method=args.methods[0],
        **engine_options(args, spill_dir=args.out / "spill"),
    )


def run_seed(args: MislabelArgs, data: TextDataset) -> dict[str, Any]:
    """One seed: split, train (or load), score with every method and reference, evaluate."""
    seed = trained_seed(args, data)
    split = seed.split
    train_loader, val_loader = seed.loader(split.train), seed.loader(split.val)
    test_accuracy = float((predict(seed.model, seed.loader(split.test)) == split.test.labels).double().mean())
    predicted = predict(seed.model, train_loader)
    engine = influence_engine(args, seed)
    methods, skipped = _methods_for(args, engine)
    # A killed run resumes both passes from here (the adapter itself comes back from its cache).
    checkpoints = args.out / "checkpoints" / f"rank{args.rank}_seed{args.seed}"
    every = CHECKPOINT_EVERY
    engine.fit(
        train_loader,
        methods=[*methods, SELF_INFLUENCE],
        checkpoint=checkpoints.with_suffix(".fit.ckpt"),
        checkpoint_every=every,
    )
    scored = engine.score_methods(
        train_loader,
        val_loader,
        methods,
        self_influence=SELF_INFLUENCE,
        checkpoint=checkpoints.with_suffix(".score.ckpt"),
        checkpoint_every=every,
    )
    remove_if_empty(checkpoints.parent)
    scores = {**scored, "self-influence": -scored.self_influence, "training loss": scored.train_loss}
    scores["random"] = torch.rand(args.n_train, generator=torch.Generator().manual_seed(args.seed))
    rows = [_detection_row(name, s, split.flipped, engine.ihvp_seconds.get(name)) for name, s in scores.items()]
    return {
        "seed": args.seed,
        "split": split,
        "scores": scores,
        "predicted": predicted,
        "rows": rows,
        "test_accuracy": test_accuracy,
        "training": seed.training,
        "skipped": skipped,
        "diagnostics": [d.to_dict() for d in engine.diagnostics()],
        "spectrum": engine.spectrum(),
        "gradient_cache": {
            "gradient_bytes": engine.gradient_bytes,
            "budget_bytes": engine.config.runtime.cache_bytes,
            "store": engine.gradient_store,
        },
    }


def _methods_for(args: MislabelArgs, engine: InfluenceEngine) -> tuple[list[str], dict[str, str]]:
    """``--methods``, and with ``--fim`` the flattened-FIM methods where the blocks allow them (else why not)."""
    methods, skipped = list(args.methods), {}
    for m in FIM_METHODS if args.fim else ():
        reason = engine.unsupported_reason(m)
        if reason is not None:
            skipped[m] = reason
        elif m not in methods:
            methods.append(m)
    return methods, skipped


def _detection_row(name: str, scores: torch.Tensor, flipped: torch.Tensor, seconds: float | None) -> dict[str, Any]:
    return {
        "method": name,
        **detection_summary(scores, flipped),
        "ihvp_seconds": seconds,
    }


def run_mislabel(args: MislabelArgs, seeds: int = 1, ranks: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Run every rank in ``ranks`` (default: ``args.rank``) for ``seeds`` seeds each; write and print the results."""
    ranks = ranks or (args.rank,)
    flip_count(args.flip_fraction, args.n_train)  # detection needs flipped and clean labels (explain does not)
    data = load_task(args)
    report_skipped(data, args.task)
    runs = []
    for rank in ranks:
        for offset in range(seeds):
            run = run_seed(replace(args, rank=rank, seed=args.seed + offset), data)
            run["rank"] = rank
            run["label"] = f"seed{run['seed']}" if len(ranks) == 1 else f"rank{rank}_seed{run['seed']}"
            trained = (
                "cached adapter" if run["training"]["cached"] else "trained in %.0f s" % run["training"]["seconds"]
            )
            print(f"rank {rank}, seed {run['seed']}: clean test accuracy {run['test_accuracy']:.3f} ({trained})")
            cache = run["gradient_cache"]
            if cache["store"] != "memory":
                where = (
                    "spilled to --out/spill/ on disk"
                    if cache["store"] == "disk"
                    else "recomputed by every pass over the training set"
                )
                print(
                    f"  per-sample gradients ({cache['gradient_bytes'] / 2**30:.2f} GiB) exceed the "
                    f"{cache['budget_bytes'] / 2**30:.2f} GiB memory cache: {where}"
                )
            for method, why in run["skipped"].items():
                print(f"  skipped {method}: {why}")
            runs.append(run)
    summary = [entry for rank in ranks for entry in summarize([r for r in runs if r["rank"] == rank])]
    write_outputs(args, data, runs, summary)
    for rank in ranks:
        print_summary([e for e in summary if e["rank"] == rank], seeds, rank if not args.last_layer else None)
    print_run_suspects(args, data, runs[0])
    print(f"peak memory (RSS) of this process: {peak_rss_mib():.0f} MiB; results written to {args.out}/")
    return summary


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every detection-table column, per method."""
    summary = []
    for method in [row["method"] for row in runs[0]["rows"]]:
        per_seed = [next(r for r in run["rows"] if r["method"] == method) for run in runs]
        entry: dict[str, Any] = {"rank": runs[0]["rank"], "method": method, "seeds": len(runs)}
        for column in per_seed[0]:
            if column == "method" or per_seed[0][column] is None:
                continue
            values = torch.tensor([r[column] for r in per_seed], dtype=torch.float64)
            entry[column] = float(values.mean())
            entry[f"{column}_std"] = float(values.std()) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def write_outputs(
    args: MislabelArgs, data: TextDataset, runs: list[dict[str, Any]], summary: list[dict[str, Any]]
) -> None:
    import pandas as pd

    out = args.out
    rows = [{"rank": run["rank"], "seed": run["seed"], **row} for run in runs for row in run["rows"]]
    atomic_write(out / "detection.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    atomic_write(out / "summary.csv", lambda tmp: pd.DataFrame(summary).to_csv(tmp, index=False))
    for run in runs:
        split = run["split"]
        frame = pd.DataFrame(
            {
                "text": split.train.texts,
                "given_label": [data.label_names[i] for i in split.train.labels.tolist()],
                "true_label": [data.label_names[i] for i in split.true_train_labels.tolist()],
                "predicted_label": [data.label_names[i] for i in run["predicted"].tolist()],
                "flipped": split.flipped.numpy(),
                **{f"score_{name}": s.detach().cpu().numpy() for name, s in run["scores"].items()},
            }
        )
        atomic_write(out / f"scores_{run['label']}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    write_json(
        out / "arguments.json",
        {
            "args": asdict(args),
            "label_names": data.label_names,
            "skipped_rows": {"task": data.skipped},
            "peak_rss_mib": peak_rss_mib(),
            "runs": [
                {
                    k: run[k]
                    for k in (
                        "rank",
                        "seed",
                        "test_accuracy",
                        "training",
                        "skipped",
                        "gradient_cache",
                        "diagnostics",
                        "spectrum",
                    )
                }
                for run in runs
            ],
        },
    )
    plot_detection(runs[0], out / "detection.png")
    if len({run["rank"] for run in runs}) > 1:
        plot_rank_sweep(summary, out / "rank_sweep.png")


def plot_detection(run: dict[str, Any], path: Path) -> None:
    """Detection rate against inspection rate, one line per method (Fig. 2 style), plus the oracle."""
    flipped = run["split"].flipped
    n = flipped.numel()
    inspected = torch.arange(1, n + 1, dtype=torch.float64) / n
    fig, ax = new_figure()
    for name, scores in run["scores"].items():
        style: dict[str, Any] = {}
        if name in REFERENCES:
            style = {"linestyle": "--"}
        elif name.startswith("exact"):  # dotted: it usually lies on its Schulz counterpart and would hide it
            style = {"linestyle": ":", "linewidth": 2.5}
        ax.plot(inspected, detection_curve(scores, flipped), label=name, **style)
    oracle = torch.clamp(torch.arange(1, n + 1, dtype=torch.float64) / int(flipped.sum()), max=1.0)
    ax.plot(inspected, oracle, color="black", linewidth=0.8, label="oracle")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("share of training data inspected")
    ax.set_ylabel("share of flipped labels found")
    ax.set_title(f"mislabel detection (seed {run['seed']})")
    save_figure(fig, ax, path)


def plot_rank_sweep(summary: list[dict[str, Any]], path: Path) -> None:
    """Time of the inverse-Hessian-vector product against LoRA rank, one line per method (Figs. 6-7 style)."""
    fig, ax = new_figure()
    methods = [e["method"] for e in summary if "ihvp_seconds" in e]
    for method in dict.fromkeys(methods):
        points = [(e["rank"], e["ihvp_seconds"]) for e in summary if e["method"] == method]
        ax.plot(*zip(*points), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("inverse-Hessian-vector product time (s)")
    save_figure(fig, ax, path)


def print_summary(summary: list[dict[str, Any]], seeds: int, rank: int | None) -> None:
    setting = f"rank {rank}" if rank is not None else "last layer + head"
    print_detection_table(
        summary,
        f"{setting}: share of flipped labels found after inspecting the top-ranked share of training data",
        seeds,
    )


def print_run_suspects(args: MislabelArgs, data: TextDataset, run: dict[str, Any]) -> None:
    """The training examples of ``run`` that HyperINF (or the first method run) ranks most harmful."""
    split = run["split"]
    print_suspects(
        run["scores"],
        args.methods,
        split.train.labels,
        run["predicted"],
        split.flipped,
        data.label_names,
        split.train.texts,
    )
    print(f"(seed {run['seed']}; every example with its scores: {args.out / ('scores_' + run['label'] + '.parquet')})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf mislabel`` options: the run's settings, then its ranks and seeds."""
    add_options(parser, MislabelArgs, skip=("adapter",))
    parser.add_argument(
        "--ranks",
        type=int_list,
        default=(),
        help="comma-separated LoRA ranks for a sweep, e.g. 1,2,4,8,16 (overrides --rank)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="number of seeds, from --seed on; the table reports mean ± std (default: 1)",
    )


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf mislabel`` from parsed arguments."""
    run_mislabel(from_namespace(MislabelArgs, ns), seeds=ns.seeds, ranks=ns.ranks)
    return 0
