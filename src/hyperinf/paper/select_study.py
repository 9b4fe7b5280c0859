"""``hyperinf experiment select``: the paper's data-selection protocol (Sec. 5.2, Tables 3-4).

Per seed: warm the model up on the whole pool, score the pool against the target set with every
method, keep the top k% for each fraction, continue training from the warm-up on each selection
and measure accuracy on a held-out test set. Beside the methods: the first method's selections by
cosine and per target (BIDS' turns), random selections (the mean of ``random_draws`` draws, drawn
per label under ``balance``), the full pool, and the references a practitioner tries first — the
lowest training loss, LESS (cosine of each example's gradient with the mean target gradient) and
RDS+ (hidden-state similarity, no gradients). The rows are labelled texts (accuracy of the
predicted label) or multiple-choice questions (lm-eval-harness' acc and acc_norm).
``variant="noisy"`` flips a share of the pool's labels (replaces a share of its answer keys) and
reports how many of them each selector kept. Every trained model, score file and accuracy is
cached under a key of its settings, so a rerun or an interrupted run redoes only what is missing
(two selectors that pick the same rows share one training).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from hyperinf.app.arguments import add_options, check_methods, from_namespace, method_list, option, override
from hyperinf.app.finetune import (
    Schedule,
    load_trainable,
    train_or_load,
    trainable_state,
    trained_path,
    training_key,
)
from hyperinf.app.learners import Learner
from hyperinf.app.report import new_figure, save_figure
from hyperinf.app.select import (
    PoolSplit,
    SelectArgs,
    Splits,
    composition,
    fraction_label,
    load_pool_split,
    make_learner,
    method_scores,
    score_pool,
    target_loss_by_label,
    warm_up,
)
from hyperinf.app.select_rows import load_row_split, reads_rows, row_learner
from hyperinf.errors import DataError
from hyperinf.hf.choices import answer_choices
from hyperinf.hf.formats import answer_index, plain_rows
from hyperinf.hf.lm import mean_hidden_states
from hyperinf.results import atomic_write, write_json
from hyperinf.selection import representation_scores, round_robin, select_top, selection_size

STUDY_METHODS = ("hyperinf", "datainf", "lissa", "tracin", "exact")
DENSE_METHODS = ("ekfac",)  # Table 4 compares EK-FAC on the dense last block
REFERENCES = ("less", "training loss", "RDS+", "random")
LEVELS = ("full pool", "warm-up only")  # one accuracy each, drawn as horizontal lines


@dataclass
class StudyArgs(SelectArgs):
    """A :class:`SelectArgs` run plus the protocol's test set, continuation training and seeds;
    ``methods=None``: :data:`STUDY_METHODS`, and :data:`DENSE_METHODS` with ``dense``."""

    variant: str = option(
        "clean",
        choices=("clean", "noisy"),
        help="clean pool (the paper's setting) or noisy: --flip-fraction of pool labels flipped (of a "
        "multiple-choice task's answer keys replaced by a distractor's)",
    )
    flip_fraction: float = option(
        0.2, help="share of flipped pool labels (replaced answer keys) with --variant noisy (default: %(default)s)"
    )
    n_pool: int = override(SelectArgs, "n_pool", default=400)
    n_target: int = override(SelectArgs, "n_target", default=50)
    n_test: int = option(200, help="held-out test examples (default: %(default)s)")
    methods: tuple[str, ...] | None = option(
        None,
        parse=method_list,
        help=f"comma-separated influence methods (default: {','.join(STUDY_METHODS)}, and "
        f"{','.join(DENSE_METHODS)} with --dense)",
    )
    continue_epochs: int = option(
        2, help="epochs of training on each selection, from the warm-up (default: %(default)s)"
    )
    random_draws: int = option(3, help="random selections per fraction and seed (default: %(default)s)")
    seeds: int = option(1, help="number of seeds; tables report mean ± std (default: %(default)s)")
    normalize: bool = override(
        SelectArgs,
        "normalize",
        default=False,
        negatable=False,
        help="select by -cos(H^-1 v, g_k) for every method (without it the first method's cosine is a column too)",
    )
    balance: bool = override(
        SelectArgs,
        "balance",
        default=False,
        negatable=False,
        help="keep the same fraction of every label (the random selections too; the paper's protocol does not)",
    )
    out: Path = override(SelectArgs, "out", default=Path("runs/select-study"))

    def __post_init__(self) -> None:
        self.balance = bool(self.balance)  # the paper's protocol: unbalanced unless asked (select's default is auto)
        super().__post_init__()
        if self.methods is None:
            self.methods = STUDY_METHODS + (DENSE_METHODS if self.dense else ())
        if self.n_test < 0:
            raise DataError(f"--n-test {self.n_test}: must be at least 0")
        if not 0.0 < self.flip_fraction < 1.0:
            raise DataError(f"--flip-fraction {self.flip_fraction:g}: must be in (0, 1)")

    def scored_blocks(self) -> str:
        """The attributed blocks, as tables and figures name them."""
        return "dense last block" if self.dense else f"LoRA r={self.rank}"


A = TypeVar("A", bound=StudyArgs)


def run_study(args: A, make_setup: Callable[[A], Setup] | None = None) -> list[dict[str, Any]]:
    """Every seed of the protocol; writes results.csv, summary.csv, a figure and arguments.json. ``make_setup``
    gives a seed's material (default: :func:`label_setup` or :func:`choice_setup` by the rows of ``args.task``)."""
    if args.variant not in ("clean", "noisy"):
        raise DataError(f"--variant must be 'clean' or 'noisy', got {args.variant!r}")
    check_methods(args.methods)
    rows, records = [], []
    for offset in range(args.seeds):
        seed_rows, record = run_seed(replace(args, seed=args.seed + offset), make_setup)
        rows += seed_rows
        records.append(record)
    summary = summarize(rows)
    write_study(args, rows, summary, records)
    print_study(args, summary)
    return summary


def study_split(args: StudyArgs) -> PoolSplit:
    """The pool (its labels flipped in the noisy variant), target and test set of one seed of the protocol."""
    return load_pool_split(
        args, n_test=args.n_test, flip_fraction=args.flip_fraction if args.variant == "noisy" else 0.0
    )


@dataclass
class Setup:
    """One seed's material, whatever its rows: the learner, the pool / target / test split and how a selection
    is described and a model is tested (labelled texts: :func:`label_setup`; multiple-choice rows:
    :func:`choice_setup`)."""

    learner: Learner
    split: Splits
    labels: torch.Tensor | None  # the pool's labels (what --balance keeps the shares of); None: no labels
    lengths: torch.Tensor  # tokens per pool example
    flipped: torch.Tensor  # pool examples whose label or answer key the noisy variant replaced
    test_key: str  # names the test set in the evaluation cache
    measure: Callable[[], dict[str, float]]  # test accuracy of the model now loaded
    make_up: Callable[[torch.Tensor], dict[str, float]]  # a selection's shares of labels (or topics, answer keys)
    n_test: int
    warm_up: Callable[[], dict[str, Any]]  # trains (or loads) the model the pool is scored with; its record has a "key"
    details: dict[str, Any] = field(default_factory=dict)  # what else the seed's record keeps


def label_setup(args: StudyArgs) -> Setup:
    """Labelled texts (tweets, BBC titles): accuracy of the predicted label, overall and per true label."""
    split = study_split(args)
    if split.test.labels.numel() == 0:
        raise DataError(
            "the protocol needs a test set: raise --n-test (and leave --target unset: the test set is held out of --task)"
        )
    learner = make_learner(args, split.pool.label_names)
    lengths = torch.tensor(learner.token_lengths(split.pool.texts))

    def measure() -> dict[str, float]:
        # per true label too: a model that answers one label to everything shows as 1 and 0
        test = split.test
        correct = (learner.predict(test.texts, args.batch_size) == test.labels).double()
        return {"accuracy": float(correct.mean())} | {
            f"accuracy_{name}": float(correct[test.labels == i].mean())
            for i, name in enumerate(test.label_names)
            if (test.labels == i).any()
        }

    def make_up(picked: torch.Tensor) -> dict[str, float]:
        made = composition(split.pool, picked, lengths)
        return {f"share_{name}": count / made["size"] for name, count in made["labels"].items()}

    test_key = training_key({}, split.pairs("test"))
    labels, n_test = split.pool.labels, split.test.labels.numel()
    return Setup(
        learner,
        split,
        labels,
        lengths,
        split.flipped,
        test_key,
        measure,
        make_up,
        n_test,
        pool_warm_up(args, learner, split),
    )


def choice_setup(args: StudyArgs) -> Setup:
    """Multiple-choice rows (``bbc-title-mc``, ``bbc-next-mc`` or a file): trained on prompt -> correct option,
    tested like lm-eval-harness (``accuracy`` = acc, ``accuracy_norm`` = acc_norm, and acc per topic)."""
    learner = row_learner(args)
    split = load_row_split(args, learner.tokenizer, n_test=args.n_test, variant=args.variant, noise=args.flip_fraction)
    if split.pool.format != "multiple-choice":
        raise DataError(
            f"the protocol tests on multiple-choice rows, and {args.task} holds {split.pool.format} rows: "
            "use hyperinf select for them"
        )
    if not split.test:
        raise DataError("the protocol needs a test set: raise --n-test")
    print(split.pool.summary(args.task))
    records = plain_rows(split.frame, split.pool_rows())
    lengths = torch.tensor([len(e["input_ids"]) for e in split.pairs("pool")])
    flipped = torch.tensor([bool(row.get("key_replaced")) for row in records], dtype=torch.bool)

    keys = torch.tensor([answer_index(row) for row in split.test])
    topics = [str(row.get("topic")) for row in split.test]
    pool_keys = torch.tensor([answer_index(row) for row in records])
    options = max(len(row["choices"]) for row in records)
    pool_topics = [row.get("topic") for row in records]

    def measure() -> dict[str, float]:
        answers = answer_choices(learner.model, learner.tokenizer, split.test, args.batch_size)
        result = answers.accuracy(keys.tolist())
        for topic in sorted(set(topics) - {"None"}):
            mine = torch.tensor([t == topic for t in topics])
            result[f"accuracy_{topic}"] = float((answers.answer[mine] == keys[mine]).double().mean())
        return result

    def make_up(picked: torch.Tensor) -> dict[str, float]:
        shares = {f"share_key_{k}": float((pool_keys[picked] == k).double().mean()) for k in range(options)}
        if "topic" in records[0]:
            chosen = [pool_topics[i] for i in picked.tolist()]
            shares |= {f"share_{t}": chosen.count(t) / len(chosen) for t in sorted(set(pool_topics))}
        return shares

    test_key = training_key({}, split.test)
    return Setup(
        learner,
        split,
        None,
        lengths,
        flipped,
        test_key,
        measure,
        make_up,
        len(split.test),
        pool_warm_up(args, learner, split),
    )


def study_setup(args: StudyArgs) -> Setup:
    """The seed's material for the rows of ``--task``: multiple-choice rows or labelled texts."""
    return choice_setup(args) if reads_rows(args) else label_setup(args)


def pool_warm_up(args: StudyArgs, learner: Learner, split: Splits) -> Callable[[], dict[str, Any]]:
    """The protocol's warm-up: training on the whole pool (:func:`hyperinf.app.select.warm_up`)."""
    return lambda: warm_up(args, learner, split.pairs("pool"))


def run_seed(args: A, make_setup: Callable[[A], Setup] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One seed: split, warm up, score, then train and test on every selection."""
    setup = make_setup(args) if make_setup else study_setup(args)
    learner, split = setup.learner, setup.split
    warm = setup.warm_up()
    warm_state = trainable_state(learner.model)
    record: dict[str, Any] = {"seed": args.seed, **setup.details, "warm_up": warm}
    if isinstance(split, PoolSplit):
        record["target_loss_by_label"] = target_loss_by_label(learner, split, args.batch_size)
    start = time.perf_counter()
    scored = score_pool(args, learner, split, list(args.methods), warm["key"], per_target=not args.balance)
    scoring = time.perf_counter() - start
    start = time.perf_counter()
    similarity = rds_scores(learner, split, args.batch_size)
    record["timing"] = {
        "scoring_seconds": scoring,
        "rds_seconds": time.perf_counter() - start,
        **pass_costs(learner, split, args.batch_size),
    }
    record["n"] = {"pool": len(setup.lengths), "target": len(split.pairs("target")), "test": setup.n_test}
    test = Evaluation(args, setup, warm_state, warm["key"])
    rows = [test.row("warm-up only", 0.0, None)]
    for name, picks in selections(args, scored, similarity, setup).items():
        rows += [test.row(name, fraction, picked) for fraction, picked in picks.items()]
    n = len(setup.lengths)
    for draw in range(args.random_draws):
        permutation = torch.rand(n, generator=torch.Generator().manual_seed(1000 * args.seed + draw))
        for fraction in args.fractions:
            # Under --balance random keeps every label's share too: the methods are compared with a draw of the same make-up.
            picked = select_top(permutation, fraction, setup.labels, balance=args.balance)
            rows.append({**test.row("random", fraction, picked), "draw": draw})
    rows.append(test.row("full pool", 1.0, torch.arange(n)))
    return [{"seed": args.seed, **row} for row in rows], record


@torch.no_grad()
def rds_scores(learner: Learner, split: Splits, batch_size: int) -> torch.Tensor:
    """RDS+: each pool example's highest cosine with a target example, between the warm-up model's mean final
    hidden states (negated: most similar kept first)."""
    pool, target = (
        mean_hidden_states(learner.model, learner.loader(split.pairs(which), batch_size))
        for which in ("pool", "target")
    )
    return representation_scores(pool, target, "max")


def rankings(args: StudyArgs, scored: dict[str, torch.Tensor], similarity: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per selector that ranks the whole pool, its scores (lowest kept first): every method, the first method's
    cosine, LESS (TracIn's cosine), the lowest training loss and RDS+."""
    first = args.methods[0]
    scores = {m: method_scores(scored, m, args.normalize) for m in args.methods}
    if not args.normalize and first != "tracin":  # TracIn's cosine is LESS
        scores[f"{first} cos"] = method_scores(scored, first, normalize=True)
    if "tracin" in args.methods:
        scores["less"] = method_scores(scored, "tracin", normalize=True)
    scores["training loss"] = scored["train_loss"]
    scores["RDS+"] = similarity
    return scores


def selections(
    args: StudyArgs, scored: dict[str, torch.Tensor], similarity: torch.Tensor, setup: Setup
) -> dict[str, dict[float, torch.Tensor]]:
    """Per selector and fraction, the pool examples kept: the top of every :func:`rankings` score, and the
    first method per target too (BIDS' turns; not under --balance)."""
    result = {
        name: {f: select_top(s, f, setup.labels, balance=args.balance) for f in args.fractions}
        for name, s in rankings(args, scored, similarity).items()
    }
    if not args.balance:
        n = len(setup.lengths)
        result[f"{args.methods[0]} per-target"] = {
            f: round_robin(scored["per_target"], selection_size(f, n)) for f in args.fractions
        }
    return result


class Evaluation:
    """Continue training from the warm-up on a selection (cached) and measure test accuracy (cached)."""

    def __init__(self, args: StudyArgs, setup: Setup, warm_state: dict[str, torch.Tensor], warm_key: str) -> None:
        self.args, self.setup, self.warm_state, self.warm_key = args, setup, warm_state, warm_key
        self.schedule = Schedule(epochs=args.continue_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        self.pool = setup.split.pairs("pool")

    def row(self, selector: str, fraction: float, picked: torch.Tensor | None) -> dict[str, Any]:
        """One table cell: train on ``picked`` (``None``: keep the warm-up) and test; the selection's make-up."""
        learner = self.setup.learner
        load_trainable(learner.model, self.warm_state)  # every cell starts from the warm-up
        key, training = self.warm_key, None
        if picked is not None:
            pairs = [self.pool[i] for i in sorted(picked.tolist())]
            key = training_key({"stage": "continue", "warm_up": self.warm_key, **asdict(self.schedule)}, pairs)
            training = train_or_load(
                learner.model,
                learner.loss,
                pairs,
                learner.collate,
                self.schedule,
                trained_path(self.args.cache_dir, key),
                progress=self.args.progress,
                desc=f"{selector} {fraction:.0%}",
            )
        row: dict[str, Any] = {
            "selector": selector,
            "fraction": fraction,
            **self.accuracy(key),
            "trained_seconds": training and training["seconds"],
        }
        if picked is not None:
            row["size"] = picked.numel()
            row["mean_tokens"] = float(self.setup.lengths[picked].double().mean())
            row.update(self.setup.make_up(picked))
            if self.setup.flipped.any():
                row["flipped_kept"] = float(self.setup.flipped[picked].double().mean())
        return row

    def accuracy(self, model_key: str) -> dict[str, float]:
        """Test accuracy of the model now loaded (:attr:`Setup.measure`), cached by its weights' key and the test set."""
        path = self.args.cache_dir.parent / "evals" / f"{model_key}_{self.setup.test_key}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if len(cached) > 1:  # evaluations cached before per-label accuracy are redone
                return cached
        result = self.setup.measure()
        write_json(path, result)
        return result


def pass_costs(learner: Learner, split: Splits, batch_size: int, batches: int = 2) -> dict[str, float]:
    """Seconds per example of a plain forward+backward of the pool's first batches (the yardstick of the scoring pass)."""
    examples = split.pairs("pool")[: batches * batch_size]
    loader = learner.loader(examples, batch_size)
    learner.model.zero_grad()
    start = time.perf_counter()
    for batch in loader:
        learner.loss(learner.model, batch).mean().backward()
    seconds = time.perf_counter() - start
    learner.model.zero_grad(set_to_none=True)
    return {"forward_backward_seconds_per_example": seconds / len(examples)}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (selector, fraction); random draws are averaged within a seed first."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    numeric = [
        c
        for c in frame.columns
        if c not in ("seed", "selector", "fraction", "draw") and pd.api.types.is_numeric_dtype(frame[c])
    ]
    keys = ["selector", "fraction"]
    per_seed = frame.groupby(["seed", *keys], sort=False)[numeric].mean().reset_index()
    grouped = per_seed.groupby(keys, sort=False)
    summary = grouped[numeric].mean().reset_index()
    stds = grouped[numeric].std(ddof=1).fillna(0.0).add_suffix("_std").reset_index(drop=True)
    summary = pd.concat([summary, stds], axis=1)
    summary["seeds"] = grouped.size().to_numpy()
    return summary.to_dict("records")


def write_study(
    args: StudyArgs, rows: list[dict[str, Any]], summary: list[dict[str, Any]], records: list[dict[str, Any]]
) -> None:
    import pandas as pd

    atomic_write(args.out / "results.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    atomic_write(args.out / "summary.csv", lambda tmp: pd.DataFrame(summary).to_csv(tmp, index=False))
    write_json(args.out / "arguments.json", {"args": asdict(args), "seeds": records})
    plot_study(args, summary, args.out / "selection.png")


def plot_study(args: StudyArgs, summary: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against the kept fraction, one line per selector, the full pool and warm-up as levels."""
    fig, ax = new_figure()
    levels = {e["selector"]: e["accuracy"] for e in summary if e["selector"] in LEVELS}
    for selector in dict.fromkeys(e["selector"] for e in summary if e["selector"] not in levels):
        points = sorted((e["fraction"], e["accuracy"]) for e in summary if e["selector"] == selector)
        style = (
            {"linestyle": "--"}
            if selector in REFERENCES
            else {"linestyle": ":", "linewidth": 2.5}
            if selector == "exact"
            else {}
        )
        ax.plot(*zip(*points), marker="o", label=selector, **style)  # exact dotted: it usually lies on hyperinf
    for (name, value), color in zip(levels.items(), ("black", "grey")):
        ax.axhline(value, color=color, linewidth=0.9, linestyle=":", label=name)
    ax.set_xlabel("share of the pool kept")
    ax.set_ylabel("test accuracy")
    how = ", balanced" if args.balance else ""
    ax.set_title(f"data selection: {args.model} {args.scored_blocks()}, {args.task}, {args.variant}{how}")
    save_figure(fig, ax, path)


def print_study(args: StudyArgs, summary: list[dict[str, Any]]) -> None:
    seeds = summary[0]["seeds"] if summary else 0
    print(
        f"\ntest accuracy after training on the kept share ({args.model}, {args.scored_blocks()}, "
        f"{args.task}, {args.variant} pool, {seeds} seed{'s' if seeds != 1 else ''}{', mean ± std' if seeds > 1 else ''})"
    )
    selectors = list(dict.fromkeys(e["selector"] for e in summary))
    fractions = sorted({e["fraction"] for e in summary if e["selector"] not in LEVELS})
    tables = [("accuracy", "accuracy")]
    if any("accuracy_norm" in e for e in summary):
        tables.append(("accuracy_norm", "acc_norm (log-likelihood per character)"))
    if args.variant == "noisy":
        pool = next((e["flipped_kept"] for e in summary if e["selector"] == "full pool"), float("nan"))
        tables.append(
            ("flipped_kept", f"share of flipped labels / replaced keys among the kept (the pool: {pool:.3f})")
        )
    for column, title in tables:
        print(f"{title}\n{'selector':<20}" + "".join(f"{fraction_label(f):>16}" for f in fractions))
        for selector in selectors:
            cells = {e["fraction"]: e for e in summary if e["selector"] == selector}
            if selector in LEVELS:
                if column != "flipped_kept":
                    print(f"{selector:<20}{_cell(next(iter(cells.values())), column, seeds):>16}")
                continue
            print(f"{selector:<20}" + "".join(f"{_cell(cells.get(f, {}), column, seeds):>16}" for f in fractions))


def _cell(entry: dict[str, Any], column: str, seeds: int) -> str:
    value = entry.get(column)
    if value is None or value != value:
        return "-"
    return f"{value:.3f} ± {entry.get(column + '_std', 0.0):.3f}" if seeds > 1 else f"{value:.3f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf experiment select`` options: ``hyperinf select``'s but ``--method``, and the protocol's."""
    # The study trains its own warm-up on built-in tasks or a file's labelled or multiple-choice rows (columns as
    # named); column maps, a given adapter and the selection strategy are select's.
    add_options(parser, StudyArgs, skip=("method", "format", "columns", "adapter", "no_warmup", "strategy"))


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf experiment select`` from parsed arguments."""
    run_study(from_namespace(StudyArgs, ns))
    return 0
