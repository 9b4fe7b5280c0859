"""``hyperinf score``: which training rows made a model, as it is, answer its targets as it does. No training.

The model is a ``save_pretrained`` folder (or ``smollm2``), optionally with a peft adapter; the
training and target rows are a file in any of :mod:`hyperinf.hf.formats`' formats. Every training
row is scored against the target set's mean gradient with each method, and each target row (or
``--query`` text) gets its ``k`` proponents and opponents. The fitted curvature is saved in
``--out/fit`` and reused by a later run on the same model, blocks and training rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from hyperinf.app.arguments import (
    InfluenceOptions,
    add_options,
    check_methods,
    columns_option,
    engine_options,
    folder_stamp,
    from_namespace,
    method_list,
    option,
    output_folder,
    override,
)
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import DataError, FitMismatchError, NotFittedError
from hyperinf.hf.formats import FORMATS, Encoded, collator, encode, table_column
from hyperinf.hf.lm import CausalLMTask, ClassificationTask
from hyperinf.hf.models import LoadedModel, default_blocks, load_model, parse_blocks
from hyperinf.hf.tables import read_table
from hyperinf.results import atomic_write, remove_if_empty, write_json, write_jsonl
from hyperinf.scoring import TopK
from hyperinf.task import Task

SIGN = "score = -v^T H^-1 g_k: negative = helpful (up-weighting the row lowers the target loss), positive = harmful"
SHIPPED = ("smollm2",)
QUERY_HELP = (
    "a text to attribute instead of --target (repeatable): its every token for a causal LM, the predicted label "
    "for a classifier"
)


@dataclass
class ModelRowsArgs(InfluenceOptions):
    """A user's model and training rows, and how their gradients are computed: what ``hyperinf score`` and
    ``hyperinf index build`` share."""

    model: str | None = option(
        None, parse=str, help="a folder written by save_pretrained (a causal LM or a sequence classifier), or smollm2"
    )
    adapter: Path | None = option(None, parse=Path, help="a peft adapter folder (save_pretrained) to put on --model")
    blocks: str | None = option(
        None,
        parse=str,
        help="what to attribute: lora (every adapter; the default when the model has adapters), linear (every "
        "nn.Linear) or comma-separated module names",
    )
    train: Path | None = option(
        None, parse=Path, help="the training rows to score (.jsonl, .json, .csv, .tsv, .parquet or a datasets folder)"
    )
    format: str | None = option(
        None, choices=FORMATS, help="the rows' format (default: detected from the columns; see the README)"
    )
    columns: dict[str, str] = columns_option()
    max_length: int = option(512, help="tokens per example; longer ones are cut and counted (default: %(default)s)")
    loss_reduction: str = option(
        "mean",
        choices=("mean", "sum"),
        help="a causal LM example's loss: the mean (default) or the sum of its completion tokens' negative "
        "log-likelihoods",
    )
    batch_size: int = option(8, help="examples per batch (default: %(default)s)")
    cache_gib: float = option(
        4.0,
        help="GiB of per-example gradients kept in memory between passes; past it they go to --out/spill/ "
        "(default: %(default)s)",
    )
    dtype: str = override(
        InfluenceOptions,
        "dtype",
        default="float64",
        help="precision of the per-example gradients, the curvature and its inverse (default: %(default)s: a "
        "causal LM's GFIMs are too ill-conditioned for float32 Schulz; the sums cost little either way)",
    )
    model_dtype: str = option(
        "float32",
        choices=("float32", "float64"),
        help="precision of the model's weights and its forward and backward passes (default: %(default)s)",
    )
    out: Path = output_folder("runs/score")


@dataclass
class ScoreArgs(ModelRowsArgs):
    """Every setting of ``hyperinf score``."""

    target: Path | None = option(None, parse=Path, help="the target rows whose loss is attributed (same formats)")
    query: list[str] = field(default_factory=list)  # --query, repeatable: added by add_arguments
    methods: tuple[str, ...] = option(
        ("hyperinf",),
        parse=method_list,
        help="comma-separated influence methods; the first gives `score` and the top-k (default: %(default)s)",
    )
    k: int = option(10, flag="-k", help="proponents and opponents per target row or query (default: %(default)s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf score`` options (argparse)."""
    add_options(parser, ScoreArgs)
    parser.add_argument("--query", action="append", default=[], help=QUERY_HELP)


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf score`` from parsed arguments."""
    run_score(from_namespace(ScoreArgs, ns))
    return 0


def model_folder(name: str) -> Path:
    """The folder of ``--model``: a shipped model's (built on first use) or the path itself."""
    if name == "smollm2":
        from hyperinf.app.causal_lm import smollm2_folder

        return smollm2_folder()
    return Path(name)


def check_model_rows(args: ModelRowsArgs) -> None:
    """Refuse a missing model or training file and impossible batch or cache sizes before anything is loaded."""
    if args.model is None:
        raise DataError("--model is required: a folder written by save_pretrained, or smollm2")
    if args.train is None:
        raise DataError("--train is required: the file of training rows to score")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.cache_gib < 0:
        raise DataError(f"--cache-gib {args.cache_gib:g}: must be at least 0 (0 keeps nothing in memory)")


def check_attributed(target: Path | None, query: list[str], k: int) -> None:
    """Refuse attributed rows given both or neither way, and ``-k`` below one."""
    if (target is None) == (not query):
        raise DataError("give the rows to attribute as --target FILE or as --query TEXT (repeatable), one of the two")
    if k < 1:
        raise DataError(f"-k {k}: ask for at least one proponent and opponent per target")


def check_args(args: ScoreArgs) -> None:
    """Refuse incomplete or contradictory settings before anything is loaded."""
    check_model_rows(args)
    check_attributed(args.target, args.query, args.k)
    check_methods(args.methods)


@dataclass
class ScoreData:
    """The encoded training rows and the rows attributed (target rows, or queries)."""

    train: Encoded
    target: Encoded
    target_name: str
    train_frame: Any  # --train as read


def load_model_of(args: ModelRowsArgs) -> LoadedModel:
    """``--model`` (with ``--adapter``) in ``--model-dtype``."""
    assert args.model is not None
    return load_model(model_folder(args.model), adapter=args.adapter, dtype=getattr(torch, args.model_dtype))


def read_rows(args: ModelRowsArgs, loaded: LoadedModel, path: Path) -> tuple[Encoded, Any]:
    """A rows file encoded for the loaded model with the run's format options, and the table as read."""
    frame = read_table(path)
    encoded = encode(
        frame,
        loaded.tokenizer,
        loaded.kind,
        name=str(path),
        format=args.format,
        columns=args.columns,
        max_length=args.max_length,
        label2id=loaded.label2id,
    )
    return encoded, frame


def attributed_rows(
    args: ModelRowsArgs, loaded: LoadedModel, target: Path | None, queries: list[str]
) -> tuple[Encoded, str]:
    """The rows whose loss is attributed, and their name: the ``target`` file, or the ``queries`` texts (every token
    of a causal LM's; a classifier's predicted label)."""
    if target is not None:
        return read_rows(args, loaded, target)[0], str(target)
    import pandas as pd

    texts = pd.DataFrame({"text": queries})
    if loaded.kind == "causal-lm":
        query = encode(texts, loaded.tokenizer, loaded.kind, format="text", max_length=args.max_length, name="--query")
    else:
        query = encode(
            texts.assign(label=predicted_labels(loaded, queries, args.max_length)),
            loaded.tokenizer,
            loaded.kind,
            format="classification",
            max_length=args.max_length,
            name="--query",
        )
    return query, "--query"


def load_data(args: ScoreArgs, loaded: LoadedModel) -> ScoreData:
    """Read and encode ``--train`` and ``--target`` (or the ``--query`` texts) for the loaded model."""
    assert args.train is not None
    train, frame = read_rows(args, loaded, args.train)
    target, name = attributed_rows(args, loaded, args.target, args.query)
    return ScoreData(train, target, name, frame)


@torch.no_grad()
def predicted_labels(loaded: LoadedModel, texts: list[str], max_length: int) -> list[int]:
    """A classifier's predicted label id for each text."""
    batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(loaded.model.parameters()).device
    logits = loaded.model(**{k: v.to(device) for k, v in batch.items()}).logits
    return [int(i) for i in logits.argmax(-1).tolist()]


def task_of(loaded: LoadedModel, reduction: str) -> Task:
    """The per-example loss of the loaded model's kind."""
    if loaded.kind == "classifier":
        return ClassificationTask()
    return CausalLMTask(reduction)  # type: ignore[arg-type]


def loader(examples: list[dict[str, Any]], tokenizer: Any, batch_size: int) -> DataLoader:
    """The examples in their order (the engine needs one order in every pass)."""
    return DataLoader(examples, batch_size=batch_size, collate_fn=collator(tokenizer))


def describe_plan(engine: InfluenceEngine, data: ScoreData, args: ScoreArgs) -> list[str]:
    """What pass 1 and pass 2 will do: the rows used, skipped and cut, the blocks and the gradients' size and place."""
    return [
        data.train.summary(str(args.train)),
        data.target.summary(data.target_name),
        *engine.gradient_plan(len(data.train.examples)).describe(),
        f"methods: {', '.join(args.methods)}",
    ]


def train_key(args: ModelRowsArgs, train: Encoded) -> str:
    """Hash of what a fit depends on beyond the attributed blocks' weights (which the saved fit checks itself):
    the model and adapter folders (their files' names, sizes and times), the training examples, the loss and
    the blocks asked for."""
    settings = {
        "model": folder_stamp(model_folder(str(args.model))),  # the base model: the fit checks only the blocks' weights
        "adapter": folder_stamp(args.adapter),
        "blocks": args.blocks,
        "loss": args.loss_reduction,
    }
    digest = hashlib.sha256(json.dumps(settings, default=str).encode())
    for example in train.examples:
        digest.update(json.dumps(example, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def fit_or_reuse(
    engine: InfluenceEngine, args: ModelRowsArgs, train: Encoded, train_loader: DataLoader, methods: Sequence[str]
) -> str:
    """Load ``--out/fit`` when it was fitted on these training rows and holds every method's sums; else fit
    (resumable) and save it. Returns what was done, for the summary."""
    folder, key = args.out / "fit", train_key(args, train)
    key_file = folder / "train_key.json"
    if key_file.is_file() and json.loads(key_file.read_text()).get("key") == key:
        try:
            engine.load_fit(folder, train_loader=train_loader)
            for method in methods:
                engine.fitted.require(method)
            return f"reused the fit in {folder} (same model, blocks and --train rows)"
        except (FitMismatchError, NotFittedError) as why:
            reason = str(why).splitlines()[0]
            print(f"the fit in {folder} cannot be reused ({reason}): fitting again")
    checkpoint = args.out / "checkpoints" / "fit.ckpt"
    engine.fit(train_loader, methods=methods, checkpoint=checkpoint, checkpoint_every=20)
    key_file.unlink(missing_ok=True)
    engine.save_fit(folder)
    write_json(key_file, {"key": key})
    remove_if_empty(checkpoint.parent)
    return f"fitted and saved to {folder}"


def run_score(args: ScoreArgs) -> dict[str, Any]:
    """The ``hyperinf score`` job: load, fit (or reuse), score, write; returns the scores and the top-k."""
    check_args(args)
    started = time.perf_counter()
    loaded = load_model_of(args)
    data = load_data(args, loaded)
    engine = make_engine(args, loaded, args.methods)
    for line in describe_plan(engine, data, args):
        print(line)
    train_loader = loader(data.train.examples, loaded.tokenizer, args.batch_size)
    target_loader = loader(data.target.examples, loaded.tokenizer, args.batch_size)
    fitted = fit_or_reuse(engine, args, data.train, train_loader, args.methods)
    print(fitted)
    scored = engine.score_methods(train_loader, target_loader, list(args.methods))
    top = engine.top_k(train_loader, target_loader, k=min(args.k, len(data.train.examples)), method=args.methods[0])
    seconds = time.perf_counter() - started
    write_scores(args, data, {m: scored[m] for m in args.methods}, scored.train_loss, data.train_frame)
    targets = [(row, data.target.texts[row]) for row in data.target.rows]
    write_jsonl(args.out / "top_k.jsonl", top_k_records(top, data.train.rows, data.train.texts, targets))
    write_json(
        args.out / "arguments.json",
        {
            "args": asdict(args),
            "sign": SIGN,
            "model_kind": loaded.kind,
            "format": data.train.format,
            "train": data_record(data.train),
            "target": data_record(data.target),
            "blocks": block_records(engine),
            "fit": fitted,
            "seconds": seconds,
        },
    )
    print(
        f"scored {len(data.train.examples)} training rows against {len(data.target.examples)} target rows with "
        f"{', '.join(args.methods)} in {seconds:.0f} s; results written to {args.out}/"
    )
    return {"scores": {m: scored[m] for m in args.methods}, "top_k": top}


def make_engine(args: ModelRowsArgs, loaded: LoadedModel, methods: Sequence[str]) -> InfluenceEngine:
    """The engine on the loaded model's ``--blocks`` (default: its adapters, else its linear layers), checked to
    run every one of ``methods`` (the first is its default); gradients past ``--cache-gib`` spill to ``--out/spill``."""
    blocks = parse_blocks(args.blocks) if args.blocks else default_blocks(loaded.model)
    engine = InfluenceEngine(
        loaded.model,
        task_of(loaded, args.loss_reduction),
        blocks=blocks,
        method=methods[0],
        **engine_options(args, cache_bytes=int(args.cache_gib * 2**30), spill_dir=str(args.out / "spill")),
    )
    for method in methods:
        engine.check_supports(method)
    return engine


def block_records(engine: InfluenceEngine) -> list[dict[str, Any]]:
    """The attributed blocks' names and gradient layouts, for arguments.json."""
    return [{"name": b.name, "r": b.shape[0], "d": b.shape[1]} for b in engine.blocks]


def data_record(encoded: Encoded) -> dict[str, Any]:
    """What was read of a rows file, for arguments.json: its format, rows, examples, skipped and cut rows."""
    return {
        "format": encoded.format,
        "columns": encoded.columns,
        "rows": len(encoded.texts),
        "examples": len(encoded.examples),
        "skipped": {str(row): reason for row, reason in encoded.skipped.items()},
        "truncated": encoded.truncated,
    }


def write_scores(
    args: ScoreArgs, data: ScoreData, scores: dict[str, torch.Tensor], train_loss: torch.Tensor, frame: Any
) -> None:
    """scores.parquet: one row per ``--train`` row in file order; skipped rows have no score and say why."""
    import pandas as pd

    n = len(data.train.texts)
    rows = torch.tensor(data.train.rows, dtype=torch.long)

    def spread(values: torch.Tensor) -> list[float | None]:
        full = torch.full((n,), float("nan"), dtype=torch.float64)
        full[rows] = values.detach().double().cpu()
        return [None if v != v else v for v in full.tolist()]

    table = {"row": list(range(n))}
    for column in data.train.columns.values():
        table[column] = table_column(frame[column].tolist())
    table["score"] = spread(scores[args.methods[0]])
    for method, values in scores.items():
        table[f"score_{method}"] = spread(values)
    table["train_loss"] = spread(train_loss)
    table["skipped"] = [data.train.skipped.get(i) for i in range(n)]
    result = pd.DataFrame(table)
    atomic_write(args.out / "scores.parquet", lambda tmp: result.to_parquet(tmp, index=False))


def top_k_records(
    top: TopK, rows: Sequence[int], texts: Sequence[str] | Mapping[int, str], targets: Sequence[tuple[int, str]]
) -> list[dict[str, Any]]:
    """top_k.jsonl's records: per target ``(row, text)``, its proponents (most helpful first) and opponents (most
    harmful first) as row, score and text; ``rows[j]`` is the training row at position ``j`` of ``top``'s indices,
    ``texts[row]`` its text."""

    def listed(indices: torch.Tensor, scores: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {"row": rows[j], "score": float(s), "text": texts[rows[j]]}
            for j, s in zip(indices.tolist(), scores.tolist())
        ]

    return [
        {
            "target": row,
            "text": text,
            "proponents": listed(top.helpful[i], top.helpful_scores[i]),
            "opponents": listed(top.harmful[i], top.harmful_scores[i]),
        }
        for i, (row, text) in enumerate(targets)
    ]
