"""``hyperinf select`` on rows that are not labelled text: prompt-completion, chat, multiple-choice, text.

The same job as :func:`hyperinf.app.select.run_select` (warm up, score against the target,
keep the most helpful share) on a causal LM, with the rows of :mod:`hyperinf.hf.formats`: the
loss is the mean negative log-likelihood of each row's scored tokens, there are no labels to
balance, and each ``selected_<pct>.jsonl`` holds the chosen rows as they were read (plus
``row_id``, ``score`` and ``rank``), so it is a pool or target of the same format again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyperinf.app.choicetasks import TASKS as CHOICE_TASKS
from hyperinf.app.choicetasks import choice_rows
from hyperinf.app.learners import Learner, causal, trains_as_causal_lm
from hyperinf.app.select import (
    SIGN,
    TIE_BREAK,
    SelectArgs,
    fraction_label,
    keep_rows,
    method_scores,
    score_pool,
    warm_up,
    write_selected,
)
from hyperinf.app.textdata import BUILT_IN_TASKS
from hyperinf.errors import ConfigurationError, DataError
from hyperinf.hf.formats import Encoded, collator, detect_layout, encode, plain_rows, table_column
from hyperinf.hf.lm import CausalLMTask
from hyperinf.hf.tables import read_table
from hyperinf.results import atomic_write, write_json
from hyperinf.selection import ranks, selection_size


def reads_rows(args: SelectArgs) -> bool:
    """Whether ``--task`` is read as rows of a format other than classification (``--format``, or its columns)."""
    if args.task in CHOICE_TASKS:
        return True
    if args.format is not None:
        return args.format != "classification"
    if args.task in BUILT_IN_TASKS or not Path(args.task).exists():
        return False
    columns = list(map(str, read_table(args.task).columns))
    if args.text_column in columns and args.label_column in columns:
        return False  # labelled rows, under the column names given
    try:
        return detect_layout(columns, args.columns) not in ("classification",)
    except DataError:
        return False  # the labelled path names the missing columns


@dataclass
class RowSplit:
    """The pool and target rows, as examples the learner trains and scores on, and the pool's source table."""

    pool: Encoded
    target: Encoded
    pool_index: list[int]  # positions in ``pool.examples`` that form the pool (the rest is the held-out target)
    target_index: list[int]
    frame: Any  # the --task table as read (the noisy variant's: the pool's answer keys)
    test: list[dict[str, Any]] = field(default_factory=list)  # held-out rows as read, clean (the study's test set)

    def pairs(self, which: str) -> list[dict[str, Any]]:
        """The examples of the pool or the target, in order (what :func:`score_pool` and the warm-up take)."""
        source, index = (self.pool, self.pool_index) if which == "pool" else (self.target, self.target_index)
        return [source.examples[i] for i in index]

    def pool_rows(self) -> list[int]:
        """The file row of each pool example."""
        return [self.pool.rows[i] for i in self.pool_index]


def load_row_split(
    args: SelectArgs, tokenizer: Any, *, n_test: int = 0, variant: str = "clean", noise: float = 0.2
) -> RowSplit:
    """The pool (``--n-pool`` rows, seeded, or all) and the target (``--target``, or ``--n-target`` rows held out)
    of a file or a built-in multiple-choice task (built with seed 0 whatever ``--seed``: the same task each run);
    ``n_test`` more rows held out as a test set. ``variant="noisy"`` (built-in tasks only) draws the pool from
    the task's noisy variant (``noise`` of its answer keys replaced): only the pool holds replaced keys, the target
    and test rows are clean."""
    import pandas as pd

    if variant != "clean" and args.task not in CHOICE_TASKS:
        raise ConfigurationError(
            f"--variant {variant} replaces answer keys of a built-in multiple-choice task ({', '.join(CHOICE_TASKS)}), "
            f"and --task {args.task} is not one: use --variant clean"
        )
    options = {"format": args.format, "columns": args.columns, "max_length": args.max_length}

    def table(which: str) -> Any:
        return read_table(
            pd.DataFrame(choice_rows(args.task, variant=which, noise=noise)) if args.task in CHOICE_TASKS else args.task
        )

    frame = table(variant)
    pool = encode(frame, tokenizer, "causal-lm", name=args.task, **options)
    held_frame, held = frame, pool  # what the target and test rows come from: the clean rows
    if variant != "clean":
        held_frame = table("clean")
        held = encode(held_frame, tokenizer, "causal-lm", name=args.task, **options)
        if held.rows != pool.rows:
            raise DataError(f"the {variant} and clean rows of {args.task} encode to different rows: report this")
    order = torch.randperm(len(pool.examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    if args.target is not None:
        target = encode(read_table(args.target), tokenizer, "causal-lm", name=str(args.target), **options)
        target_index = list(range(len(target.examples)))
    else:
        if args.n_target + n_test >= len(order):
            raise DataError(
                f"--n-target {args.n_target}{f' and --n-test {n_test} leave' if n_test else ' leaves'} no pool of the "
                f"{len(order)} usable rows of {args.task}: lower them or pass --target FILE"
            )
        target, target_index, order = held, sorted(order[: args.n_target]), order[args.n_target :]
    test = plain_rows(held_frame, [held.rows[i] for i in sorted(order[:n_test])])
    order = order[n_test:]
    pool_index = sorted(order[: args.n_pool] if args.n_pool else order)
    for fraction in args.fractions:
        selection_size(fraction, len(pool_index))
    return RowSplit(pool, target, pool_index, target_index, frame, test)


def row_learner(args: SelectArgs) -> Learner:
    """The causal LM with LoRA (or ``--adapter``, or its trainable last block) and the mean completion loss."""
    if args.balance:
        raise ConfigurationError(f"--balance keeps each label's share, and {args.task} has no labels: drop --balance")
    if not trains_as_causal_lm(args.model):
        raise ConfigurationError(
            f"{args.format or 'these'} rows need a causal LM, and --model {args.model} is not one: pass smollm2 or a "
            "folder whose config.json names a ...ForCausalLM"
        )
    net, tokenizer, blocks = causal(args.model, rank=args.rank, seed=args.seed, dense=args.dense, adapter=args.adapter)
    return Learner(net, tokenizer, blocks, CausalLMTask().loss, collator(tokenizer))


def run_select_rows(args: SelectArgs) -> dict[str, Any]:
    """The ``hyperinf select`` job on rows of a causal-LM format; returns the scores and the selections."""
    learner = row_learner(args)
    split = load_row_split(args, learner.tokenizer)
    print(split.pool.summary(args.task))
    if args.target is not None:
        print(split.target.summary(str(args.target)))
    warm = warm_up(args, learner, split.pairs("pool"))
    scored = score_pool(args, learner, split, [args.method], warm["key"], args.strategy == "per-target")
    scores = method_scores(scored, args.method, args.normalizes(labelled=False))
    lengths = torch.tensor([len(e["input_ids"]) for e in split.pairs("pool")])
    selections = keep_rows(args, scored, scores, None)
    write_row_selection(args, split, scores, lengths, selections, warm)
    print(f"scored {len(split.pool_index)} pool rows against {len(split.target_index)} target rows with {args.method}")
    if args.normalizes(labelled=False) and args.normalize is None:
        print("  ranked by the cosine -cos(H^-1 v, g_k) (the default for rows without labels; --no-normalize)")
    for fraction, picked in selections.items():
        print(f"  {fraction:.0%}: {picked.numel()} rows, mean {lengths[picked].double().mean():.1f} tokens")
    print(f"results written to {args.out}/")
    return {"scores": scores, "selections": selections}


def write_row_selection(
    args: SelectArgs,
    split: RowSplit,
    scores: torch.Tensor,
    lengths: torch.Tensor,
    selections: dict[float, torch.Tensor],
    warm: dict[str, Any],
) -> None:
    """scores.parquet, selected_<pct>.jsonl per fraction (the rows as read) and arguments.json, each atomically."""
    import pandas as pd

    rank = ranks(scores)
    rows = split.pool_rows()
    records = plain_rows(split.frame, rows)
    table = {"row_id": rows}
    for column in split.pool.columns.values():
        table[column] = table_column([record[str(column)] for record in records])
    table |= {"score": scores.double().tolist(), "rank": rank.tolist(), "token_length": lengths.tolist()}
    frame = pd.DataFrame(table)
    atomic_write(args.out / "scores.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    for fraction, picked in selections.items():
        chosen = [
            {
                **records[i],
                "row_id": rows[i],
                "score": float(scores[i]),
                "rank": int(rank[i]),
            }
            for i in picked.tolist()
        ]
        write_selected(args.out, fraction, chosen)
    write_json(
        args.out / "arguments.json",
        {
            "args": asdict(args),
            "sign": SIGN,
            "tie_break": TIE_BREAK,
            "format": split.pool.format,
            "columns": split.pool.columns,
            "skipped_rows": {"task": split.pool.skipped, **({"target": split.target.skipped} if args.target else {})},
            "truncated_rows": {
                "task": split.pool.truncated,
                **({"target": split.target.truncated} if args.target else {}),
            },
            "warm_up": warm,
            "normalized": args.normalizes(labelled=False),
            "selections": {fraction_label(f): {"size": int(p.numel())} for f, p in selections.items()},
        },
    )
