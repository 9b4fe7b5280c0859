"""``hyperinf select``: keep the pool examples that help a target set most (paper Sec. 5.2).

The model is warmed up on the candidate pool (LoRA or the last block, one epoch by default,
seeded and cached like every trained model: :mod:`hyperinf.app.finetune`), every pool example is
scored against the target set with one influence method, and the most helpful share (most
negative score) is written out for each ``--fraction``. :func:`score_pool` and the splitting
and warm-up helpers are shared with ``hyperinf experiment select`` (:mod:`.select_study`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from hyperinf.app.arguments import (
    DataOptions,
    InfluenceOptions,
    TrainingOptions,
    add_options,
    check_methods,
    columns_option,
    engine_options,
    float_list,
    folder_stamp,
    from_namespace,
    key_settings,
    method_name,
    model_or_folder,
    option,
    output_folder,
    override,
)
from hyperinf.app.causal_lm import default_template
from hyperinf.app.finetune import Schedule, train_or_load, trained_path, training_key
from hyperinf.app.learners import MODELS, Learner, build_learner, trains_as_causal_lm
from hyperinf.app.textdata import (
    BUILT_IN_TASKS,
    SizeOptions,
    TextDataset,
    load_table,
    load_task,
    report_skipped,
    split_and_flip,
)
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import ConfigurationError, DataError
from hyperinf.hf.formats import FORMATS
from hyperinf.methods import method_names
from hyperinf.results import atomic_write, remove_if_empty, write_json, write_jsonl
from hyperinf.selection import cosine_scores, ranks, round_robin, select_top, selection_size

STRATEGIES = ("top", "per-target")
SIGN = "score = -v^T H^-1 g_k: negative = helpful (kept first), positive = harmful"
TIE_BREAK = "equal scores: lower row id first"
CHECKPOINT_EVERY = 20  # batches between checkpoints of the scoring passes (seconds of work on SmolLM2)
KINDS = {"tweets": "tweet", "bbc-titles": "news headline", "bbc": "news article"}
# A pool drawn with --n-pool 0 is the whole --task as it is: the unbalanced draw.
SELECT_SIZES = SizeOptions("--n-pool", "--n-target", "--n-test", unbalanced="pass --n-pool 0 (all of --task, as it is)")


@dataclass
class SelectArgs(InfluenceOptions, TrainingOptions, DataOptions):
    """Every setting of a selection run (those marked ``key`` form the warm-up's and the scores' cache keys)."""

    task: str = override(
        DataOptions,
        "task",
        help="'tweets' (default), 'bbc-titles' (BBC News headlines, 5 topics), 'bbc', the multiple-choice "
        "'bbc-title-mc' and 'bbc-next-mc', or a .jsonl/.json/.csv/.tsv/.parquet file or datasets folder (e.g. a "
        "selected_<pct>.jsonl): the candidate pool",
    )
    target: Path | None = option(
        None,
        parse=Path,
        help="target examples (same formats and columns); default: --n-target rows held out of --task",
    )
    n_pool: int = option(1000, help="pool examples drawn from --task (default: %(default)s; 0: all)")
    n_target: int = option(100, help="target examples held out when no --target is given (default: %(default)s)")
    fractions: tuple[float, ...] = option(
        (0.05, 0.2, 0.4),
        flag="--fraction",
        parse=float_list,
        help="comma-separated shares of the pool to keep (default: %(default)s)",
    )
    method: str = option(
        "hyperinf",
        parse=method_name,
        help=f"influence method: {', '.join(method_names())} (default: %(default)s; see `hyperinf methods`)",
    )
    normalize: bool | None = option(
        None,
        negatable=True,
        help="rank by -cos(H^-1 v, g_k) instead of the inner product (LESS: against the bias toward short texts "
        "with large gradients; default: on for rows without labels, where it was measured better, off for "
        "labelled rows, see README)",
    )
    balance: bool | None = option(
        None,
        negatable=True,
        help="keep the same fraction of every label (default: on for labelled rows with --strategy top: without it "
        "the selections collapse onto the labels the warm-up gets wrong, see README; --no-balance ranks the whole pool)",
    )
    strategy: str = option(
        "top",
        choices=STRATEGIES,
        help="top: the most helpful rows against the target's mean gradient (default); per-target: every target "
        "row ranks the pool by its own gradient and the targets take turns, each its best row not yet taken (BIDS: "
        "against a few targets dominating the mean)",
    )
    model: str = override(
        TrainingOptions,
        "model",
        default="smollm2",
        parse=model_or_folder(MODELS),
        help="the shipped SmolLM2-135M-Instruct (default), MiniLM, a tiny random Llama / BERT (tests), or a folder "
        "written by save_pretrained (a causal LM, or an encoder / classifier)",
    )
    adapter: Path | None = option(
        None,
        parse=Path,
        help="a peft adapter folder to put on --model in place of new LoRA adapters (trained further by the "
        "warm-up unless --no-warmup)",
    )
    format: str | None = option(
        None,
        choices=FORMATS,
        help="the rows' format when --task is a file (default: detected from its columns): classification "
        "(text, label) is selected per label; prompt-completion, chat, multiple-choice and text rows need a causal LM",
    )
    columns: dict[str, str] = columns_option()
    no_warmup: bool = option(
        False,
        help="score with --model (and --adapter) as given, without the warm-up: for a model already fine-tuned "
        "on the task",
    )
    dense: bool = option(
        False,
        key="training",
        help="train and attribute the last transformer block instead of LoRA (paper Table 4)",
    )
    epochs: int = override(
        TrainingOptions, "epochs", default=1, help="warm-up epochs on the pool (default: %(default)s)"
    )
    max_length: int = override(
        TrainingOptions, "max_length", default=128, help="tokens per example, prompt and answer (default: %(default)s)"
    )
    dtype: str | None = override(
        InfluenceOptions,
        "dtype",
        default=None,
        help="precision of gradients and curvature (default: float64 for SmolLM2, whose GFIMs are too "
        "ill-conditioned for float32; float32 for MiniLM)",
    )
    cache_gib: float = option(
        4.0,
        help="GiB of per-sample gradients kept in memory between passes; past it they go to --out/spill/ on disk, "
        "deleted when scoring ends (default: %(default)s)",
    )
    cache_dir: Path = override(
        TrainingOptions,
        "cache_dir",
        help="trained-weights cache (default: $HYPERINF_CACHE/adapters or ~/.cache/hyperinf/adapters); "
        "scores go beside it in scores/",
    )
    out: Path = output_folder("runs/select")

    @property
    def dense_blocks(self) -> bool:
        return self.dense

    def __post_init__(self) -> None:
        # A causal LM's hidden states have a few huge outlier dimensions: its LoRA blocks' GFIMs are
        # too ill-conditioned for float32 Schulz (SmolLM2, 48 tweets: 52 of 90 blocks stalled at a
        # residual up to 0.13), and converge in float64.
        if self.dtype is None:
            self.dtype = "float64" if trains_as_causal_lm(self.model) else "float32"
        if self.adapter is not None and self.dense:
            raise ConfigurationError(
                "--adapter and --dense exclude each other: the adapter's blocks are what is trained"
            )
        for flag, value, least in (("--n-pool", self.n_pool, 0), ("--n-target", self.n_target, 1)):
            if value < least:
                raise DataError(f"{flag} {value}: must be at least {least}" + (" (0: the whole pool)" * (least == 0)))
        if self.strategy == "per-target" and (self.balance or self.normalize):
            raise ConfigurationError(
                "--strategy per-target takes turns over the targets' own rankings: it has no --balance or --normalize"
            )
        if self.cache_gib < 0:
            raise ConfigurationError(f"--cache-gib {self.cache_gib:g}: must be at least 0 (0 keeps nothing in memory)")
        super().__post_init__()  # checks the engine options, the dtype set here too

    def normalizes(self, labelled: bool) -> bool:
        """Whether ``top`` ranks by the cosine: ``--normalize`` / ``--no-normalize``, or by default for rows without
        labels (measured ahead of the inner product there, behind it on labelled rows with ``--balance``)."""
        return self.normalize if self.normalize is not None else not labelled and self.strategy == "top"

    def balances(self, labelled: bool) -> bool:
        """Whether selections keep every label's share: ``--balance`` / ``--no-balance``, or by default for
        labelled rows ranked against the target's mean gradient (``--strategy top``)."""
        return self.balance if self.balance is not None else labelled and self.strategy == "top"

    def model_settings(self) -> dict[str, Any]:
        """What the trained or given weights depend on: the training key's settings, and the adapter when one is
        given (stamped with its files, like a model folder; absent otherwise, so earlier keys still hold)."""
        adapter = {"adapter": folder_stamp(self.adapter)} if self.adapter is not None else {}
        return key_settings(self) | adapter


class Splits(Protocol):
    """A pool and a target set, as the examples the learner takes (:class:`PoolSplit`, or rows of another format)."""

    def pairs(self, which: str) -> list[Any]: ...


@dataclass
class PoolSplit:
    """The candidate pool (labels possibly flipped), the target set and a held-out test set."""

    pool: TextDataset
    target: TextDataset
    test: TextDataset
    flipped: torch.Tensor
    files: dict[str, TextDataset] = field(default_factory=dict)  # "task", "target": each as read, skipped rows too

    def pairs(self, which: str) -> list[tuple[str, int]]:
        data = getattr(self, which)
        return list(zip(data.texts, data.labels.tolist()))


def load_pool_split(args: SelectArgs, *, n_test: int = 0, flip_fraction: float = 0.0) -> PoolSplit:
    """The pool and target of ``args`` (target: ``--target`` or a held-out split), checked for use."""
    data = load_task(args.task, args.min_confidence, args.text_column, args.label_column)
    if args.target is None:
        # Built-in tasks are drawn equally per class (a classifier cannot win by the majority class); a user's data as it is.
        split = split_and_flip(
            data,
            n_train=pool_size(args, data.labels.numel(), n_test),
            n_val=args.n_target,
            n_test=n_test,
            flip_fraction=flip_fraction,
            balanced=args.n_pool > 0 and args.task in BUILT_IN_TASKS,
            seed=args.seed,
            sizes=SELECT_SIZES,
        )
        result = PoolSplit(split.train, split.val, split.test, split.flipped, {"task": data})
    else:
        read = load_table(args.target, args.text_column, args.label_column, min_classes=1)
        target = aligned(read, data.label_names)
        pool = (
            data
            if not args.n_pool or args.n_pool >= data.labels.numel()
            else data.subset(
                torch.randperm(data.labels.numel(), generator=torch.Generator().manual_seed(args.seed))[: args.n_pool]
            )
        )
        result = PoolSplit(
            pool,
            target,
            pool.subset(torch.zeros(0, dtype=torch.long)),
            torch.zeros(pool.labels.numel(), dtype=torch.bool),
            {"task": data, "target": read},
        )
    check_selectable(result.pool, args.fractions, args.balances(labelled=True), asked=args.balance is not None)
    return result


def pool_size(args: SelectArgs, available: int, n_test: int) -> int:
    """``--n-pool``, or with ``--n-pool 0`` every usable row of ``--task`` the target (and test) set leave."""
    if args.n_pool:
        return args.n_pool
    held_out = {"--n-target": args.n_target, "--n-test": n_test}
    asked = {flag: n for flag, n in held_out.items() if n}
    if available - sum(asked.values()) < 1:
        raise DataError(
            f"holding out {' + '.join(f'{flag} {n}' for flag, n in asked.items())} leaves no pool examples of the "
            f"{available} usable rows of --task: {SELECT_SIZES.lower(*asked)}"
        )
    return available - sum(asked.values())


def aligned(target: TextDataset, label_names: list[str]) -> TextDataset:
    """The target set with its labels renumbered to the pool's label names (its row ids and skipped rows kept)."""
    unknown = sorted(set(target.label_names) - set(label_names))
    if unknown:
        raise DataError(
            f"the target set has labels the pool lacks ({', '.join(map(repr, unknown))}; the pool's: "
            f"{', '.join(map(repr, label_names))}): fix the target's label column or drop those rows"
        )
    index = torch.tensor([label_names.index(name) for name in target.label_names])
    return replace(target, labels=index[target.labels], label_names=list(label_names))


def check_selectable(pool: TextDataset, fractions: tuple[float, ...], balance: bool, asked: bool = True) -> None:
    """Refuse, before any training, a pool or fraction that cannot give a selection (``asked``: ``balance`` was
    given, not the default)."""
    if pool.labels.numel() == 0:
        raise DataError("the candidate pool is empty: pass a --task with rows (or raise --n-pool)")
    if pool.labels.unique().numel() < 2:
        raise DataError(
            f"the candidate pool holds a single label ({pool.label_names[int(pool.labels[0])]!r}): selection for a "
            "classification task needs at least two; check --label-column"
        )
    if not fractions:
        raise DataError("no --fraction given: pass shares of the pool to keep, e.g. --fraction 0.05,0.2,0.4")
    for fraction in fractions:
        selection_size(fraction, pool.labels.numel())
        if balance:
            for label in pool.labels.unique().tolist():
                try:
                    selection_size(
                        fraction, int((pool.labels == label).sum()), f"label {pool.label_names[label]!r} of the pool"
                    )
                except DataError as error:
                    if asked:
                        raise
                    raise DataError(
                        f"{error}, or pass --no-balance (by default each label keeps its share of the pool)"
                    ) from None


def make_learner(args: SelectArgs, label_names: list[str]) -> Learner:
    template = default_template(label_names, KINDS.get(args.task, "text"))
    return build_learner(
        args.model,
        label_names,
        rank=args.rank,
        seed=args.seed,
        dense=args.dense,
        max_length=args.max_length,
        template=template,
        adapter=args.adapter,
        as_given=args.no_warmup,
    )


def warm_up(args: SelectArgs, learner: Learner, pairs: list[tuple[str, int]]) -> dict[str, Any]:
    """Train on the whole pool (``args.epochs``), or load that from the cache; returns the record with its key.
    With ``--no-warmup`` the model is used as given, and the key names it."""
    if args.no_warmup:
        return {
            "cached": False,
            "seconds": 0.0,
            "key": training_key({"stage": "as-given", **args.model_settings()}, []),
        }
    return stage_training(args, learner, pairs, {"stage": "warm-up", **args.model_settings()}, "warm-up")


def stage_training(
    args: SelectArgs, learner: Learner, examples: Sequence[Any], settings: dict[str, Any], desc: str
) -> dict[str, Any]:
    """Train the learner's trainable parameters on ``examples`` (``args.epochs``, ``--lr``, ``--batch-size``,
    ``--seed``), or load them from the cache under the key of ``settings`` and the examples; the record with its key."""
    schedule = Schedule(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    key = training_key(settings, examples)
    record = train_or_load(
        learner.model,
        learner.loss,
        examples,
        learner.collate,
        schedule,
        trained_path(args.cache_dir, key),
        progress=args.progress,
        desc=desc,
    )
    return {**record, "key": key}


@torch.no_grad()
def target_loss_by_label(learner: Learner, split: PoolSplit, batch_size: int) -> dict[str, dict[str, float]]:
    """Per label, the current model's mean target loss and that label's share of the summed target loss.

    The target's mean gradient leans toward the labels that carry most of that loss, and so do the
    selections of every influence method (docs/results.md): a share far from the label's share of
    the target set says a selection will lean the same way."""
    losses = torch.cat(
        [learner.loss(learner.model, batch) for batch in learner.loader(split.pairs("target"), batch_size)]
    ).double()
    labels = split.target.labels
    return {
        name: {
            "n": int((labels == i).sum()),
            "mean_loss": float(losses[labels == i].mean()),
            "loss_share": float(losses[labels == i].sum() / losses.sum()),
        }
        for i, name in enumerate(split.target.label_names)
        if (labels == i).any()
    }


def scores_path(args: SelectArgs, split: Splits, methods: list[str], warm_key: str, per_target: bool = False) -> Path:
    """Where :func:`score_pool` caches the scores of ``methods`` on this pool, target and warm-up."""
    key = training_key(
        {
            "stage": "scores",
            "warm_up": warm_key,
            "methods": methods,
            **key_settings(args, "scores"),
            **({"strategy": "per-target"} if per_target else {}),  # earlier keys still hold
            "pool": training_key({}, split.pairs("pool")),
        },
        split.pairs("target"),
    )
    return args.cache_dir.parent / "scores" / f"{key}.safetensors"


def score_pool(
    args: SelectArgs, learner: Learner, split: Splits, methods: list[str], warm_key: str, per_target: bool = False
) -> dict[str, torch.Tensor]:
    """Every method's scores of the pool against the target, the pool's training loss and the norms that
    turn a score into a cosine (``gradient_norm``, ``direction_norm/<method>``), and with ``per_target`` each
    target row's most helpful pool rows by the first method (``per_target``, as deep as the largest
    selection); cached by a key of them all."""
    path = scores_path(args, split, methods, warm_key, per_target)
    from safetensors.torch import load_file, save_file

    depth = selection_size(max(args.fractions), len(split.pairs("pool")))  # --fraction is not in the key
    if path.exists():
        cached = load_file(str(path))
        if not per_target or cached["per_target"].shape[1] >= depth:
            return cached
    engine = InfluenceEngine(
        learner.model,
        learner.loss,
        blocks=learner.blocks,
        method=methods[0],
        **engine_options(args, cache_bytes=int(args.cache_gib * 2**30), spill_dir=args.out / "spill"),
    )
    pool, target = (
        learner.loader(split.pairs("pool"), args.batch_size),
        learner.loader(split.pairs("target"), args.batch_size),
    )
    for line in engine.gradient_plan(len(split.pairs("pool"))).describe():
        print(line)
    # A killed run resumes both passes from these files (the warm-up comes back from its cache).
    checkpoints = args.out / "checkpoints" / path.stem
    engine.fit(
        pool, methods=methods, checkpoint=checkpoints.with_suffix(".fit.ckpt"), checkpoint_every=CHECKPOINT_EVERY
    )
    scored = engine.score_methods(
        pool,
        target,
        methods,
        self_influence="tracin",
        checkpoint=checkpoints.with_suffix(".score.ckpt"),
        checkpoint_every=CHECKPOINT_EVERY,
    )
    remove_if_empty(checkpoints.parent)
    result = {f"score/{m}": scored[m] for m in methods}
    if per_target:
        result["per_target"] = engine.top_k(pool, target, k=depth, method=methods[0]).helpful
    result["train_loss"] = scored.train_loss
    result["gradient_norm"] = (-scored.self_influence).clamp_min(0).sqrt()
    for m, h in scored.directions.items():
        result[f"direction_norm/{m}"] = torch.sqrt(sum((t.double() ** 2).sum() for t in h.values())).reshape(1)
    result = {k: t.detach().cpu().contiguous() for k, t in result.items()}
    atomic_write(path, lambda tmp: save_file(result, str(tmp)))
    return result


def method_scores(scored: dict[str, torch.Tensor], method: str, normalize: bool) -> torch.Tensor:
    """A method's pool scores, as inner products or (``normalize``) as ``-cos(h, g_k)``."""
    scores = scored[f"score/{method}"]
    if not normalize:
        return scores
    return cosine_scores(scores.double(), float(scored[f"direction_norm/{method}"]), scored["gradient_norm"].double())


def composition(pool: TextDataset, picked: torch.Tensor, lengths: torch.Tensor) -> dict[str, Any]:
    """Label counts and token-length summary of a selection (what a selection collapsing onto one class or
    onto short texts looks like)."""
    labels = pool.labels[picked]
    picked_lengths = lengths[picked].double()
    return {
        "size": int(picked.numel()),
        "labels": {name: int((labels == i).sum()) for i, name in enumerate(pool.label_names)},
        "tokens": {
            "mean": float(picked_lengths.mean()),
            "min": int(picked_lengths.min()),
            "median": float(picked_lengths.median()),
            "max": int(picked_lengths.max()),
            "histogram": _histogram(picked_lengths, lengths.double()),
        },
    }


def _histogram(values: torch.Tensor, reference: torch.Tensor, bins: int = 8) -> dict[str, int]:
    edges = torch.linspace(float(reference.min()), float(reference.max()) + 1e-9, bins + 1)
    counts = torch.histc(values, bins=bins, min=float(edges[0]), max=float(edges[-1]))
    return {f"{edges[i]:.0f}-{edges[i + 1]:.0f}": int(c) for i, c in enumerate(counts.tolist())}


def run_select(args: SelectArgs) -> dict[str, Any]:
    """The ``hyperinf select`` job: warm up, score, select and write; returns what it wrote."""
    check_methods((args.method,))
    if args.columns:
        raise ConfigurationError(
            "--columns maps the columns of rows in another format; name a labelled table's columns with "
            "--text-column and --label-column"
        )
    split = load_pool_split(args)
    for which, data in split.files.items():
        report_skipped(data, str(getattr(args, which)))
    learner = make_learner(args, split.pool.label_names)
    warm = warm_up(args, learner, split.pairs("pool"))
    target_loss = target_loss_by_label(learner, split, args.batch_size)
    scored = score_pool(args, learner, split, [args.method], warm["key"], args.strategy == "per-target")
    scores = method_scores(scored, args.method, args.normalizes(labelled=True))
    lengths = torch.tensor(learner.token_lengths(split.pool.texts))
    selections = keep_rows(args, scored, scores, split.pool.labels)
    records = {
        "warm_up": warm,
        "target_loss_by_label": target_loss,
        "skipped_rows": {which: data.skipped for which, data in split.files.items()},
        "balanced": args.balances(labelled=True),
        "normalized": args.normalizes(labelled=True),
    }
    write_selection(args, split.pool, scores, lengths, selections, records)
    print(
        f"scored {split.pool.labels.numel()} pool examples against {split.target.labels.numel()} target examples with {args.method}"
    )
    shares = ", ".join(f"{name} {v['loss_share']:.0%} ({v['n']} examples)" for name, v in target_loss.items())
    print(f"  the warm-up model's target loss by label: {shares} (selections lean toward the labels that carry it)")
    if args.balances(labelled=True) and args.balance is None:
        print("  every selection keeps each label's share of the pool (the default for labelled rows; --no-balance)")
    for fraction, picked in selections.items():
        made = composition(split.pool, picked, lengths)
        print(
            f"  {fraction:.0%}: {made['size']} examples, labels {made['labels']}, mean {made['tokens']['mean']:.1f} tokens"
        )
        for label in skewed_labels(split.pool.labels, picked, split.pool.label_names):
            print(
                f"  warning: the {fraction:.0%} selection under-represents label {label!r} (less than half its share of the pool): "
                "the target's mean gradient leans toward the labels the model gets wrong, and training on such a selection "
                "can collapse onto them (docs/results.md); --strategy top with --balance (its default) keeps every label's share"
            )
    print(f"results written to {args.out}/")
    return {"scores": scores, "selections": selections}


def keep_rows(
    args: SelectArgs, scored: dict[str, torch.Tensor], scores: torch.Tensor, labels: torch.Tensor | None
) -> dict[float, torch.Tensor]:
    """Per fraction, the rows kept by ``args.strategy``: the most helpful by ``scores``, or the targets' turns."""
    if args.strategy == "per-target":
        return {f: round_robin(scored["per_target"], selection_size(f, scores.numel())) for f in args.fractions}
    balance = args.balances(labelled=labels is not None)
    return {f: select_top(scores, f, labels, balance=balance) for f in args.fractions}


def skewed_labels(labels: torch.Tensor, picked: torch.Tensor, label_names: list[str]) -> list[str]:
    """Labels whose share of the selection is under half their share of the pool."""
    pool_share = torch.bincount(labels, minlength=len(label_names)).double() / labels.numel()
    kept_share = torch.bincount(labels[picked], minlength=len(label_names)).double() / picked.numel()
    return [label_names[i] for i in torch.nonzero(kept_share < pool_share / 2).squeeze(1).tolist()]


def write_selection(
    args: SelectArgs,
    pool: TextDataset,
    scores: torch.Tensor,
    lengths: torch.Tensor,
    selections: dict[float, torch.Tensor],
    records: dict[str, Any],
) -> None:
    """scores.parquet, selected_<pct>.jsonl per fraction and arguments.json, each written atomically."""
    import pandas as pd

    rank = ranks(scores)
    row_ids = pool.ids if pool.ids is not None else torch.arange(pool.labels.numel())
    frame = pd.DataFrame(
        {
            "row_id": row_ids.numpy(),
            "text": pool.texts,
            "label": [pool.label_names[i] for i in pool.labels.tolist()],
            "score": scores.double().numpy(),
            "rank": rank.numpy(),
            "token_length": lengths.numpy(),
        }
    )
    atomic_write(args.out / "scores.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    for fraction, picked in selections.items():
        rows = [
            {
                "row_id": int(row_ids[i]),
                args.text_column: pool.texts[i],
                args.label_column: pool.label_names[int(pool.labels[i])],
                "score": float(scores[i]),
                "rank": int(rank[i]),
            }
            for i in picked.tolist()
        ]
        write_selected(args.out, fraction, rows)
    write_json(
        args.out / "arguments.json",
        {
            "args": asdict(args),
            "sign": SIGN,
            "tie_break": TIE_BREAK,
            "label_names": pool.label_names,
            "selections": {fraction_label(f): composition(pool, p, lengths) for f, p in selections.items()},
            **records,
        },
    )


def write_selected(out: Path, fraction: float, rows: list[dict[str, Any]]) -> None:
    """``selected_<pct>.jsonl``: the chosen rows, most helpful first, one JSON object per line, atomically."""
    write_jsonl(out / f"selected_{fraction_label(fraction)}.jsonl", rows)


def fraction_label(fraction: float) -> str:
    """``0.05 -> '5pct'``, ``0.125 -> '12.5pct'``: a file-name-safe percentage."""
    return f"{fraction * 100:g}pct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf select`` options (argparse)."""
    add_options(parser, SelectArgs)


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf select`` from parsed arguments: labelled rows here, the other formats in :mod:`.select_rows`."""
    from hyperinf.app.select_rows import reads_rows, run_select_rows

    args = from_namespace(SelectArgs, ns)
    run_select_rows(args) if reads_rows(args) else run_select(args)
    return 0
