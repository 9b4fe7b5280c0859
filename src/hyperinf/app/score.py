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


@dataclass
class ScoreArgs(InfluenceOptions):
    """Every setting of ``hyperinf score``."""

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
    target: Path | None = option(None, parse=Path, help="the target rows whose loss is attributed (same formats)")
    query: list[str] = field(default_factory=list)  # --query, repeatable: added by add_arguments
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
    methods: tuple[str, ...] = option(
        ("hyperinf",),
        parse=method_list,
        help="comma-separated influence methods; the first gives `score` and the top-k (default: %(default)s)",
    )
    k: int = option(10, flag="-k", help="proponents and opponents per target row or query (default: %(default)s)")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf score`` options (argparse)."""
    add_options(parser, ScoreArgs)
    parser.add_argument(
        "--query",
        action="append",
        default=[],
        help="a text to attribute instead of --target (repeatable): its every token for a causal LM, the predicted "
        "label for a classifier",
    )


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


def check_args(args: ScoreArgs) -> None:
    """Refuse incomplete or contradictory settings before anything is loaded."""
    if args.model is None:
        raise DataError("--model is required: a folder written by save_pretrained, or smollm2")
    if args.train is None:
        raise DataError("--train is required: the file of training rows to score")
    if (args.target is None) == (not args.query):
        raise DataError("give the rows to attribute as --target FILE or as --query TEXT (repeatable), one of the two")
    if args.k < 1:
        raise DataError(f"-k {args.k}: ask for at least one proponent and opponent per target")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.cache_gib < 0:
        raise DataError(f"--cache-gib {args.cache_gib:g}: must be at least 0 (0 keeps nothing in memory)")
    check_methods(args.methods)


@dataclass
class ScoreData:
    """The encoded training rows and the rows attributed (target rows, or queries)."""

    train: Encoded
    target: Encoded
    target_name: str
    train_frame: Any  # --train as read


def load_data(args: ScoreArgs, loaded: LoadedModel) -> ScoreData:
    """Read and encode ``--train`` and ``--target`` (or the ``--query`` texts) for the loaded model."""
    options = {
        "format": args.format,
        "columns": args.columns,
        "max_length": args.max_length,
        "label2id": loaded.label2id,
    }
    assert args.train is not None
    frame = read_table(args.train)
    train = encode(frame, loaded.tokenizer, loaded.kind, name=str(args.train), **options)
    if args.target is not None:
        target = encode(read_table(args.target), loaded.tokenizer, loaded.kind, name=str(args.target), **options)
        return ScoreData(train, target, str(args.target), frame)
    import pandas as pd

    texts = pd.DataFrame({"text": args.query})
    if loaded.kind == "causal-lm":
        query = encode(texts, loaded.tokenizer, loaded.kind, format="text", max_length=args.max_length, name="--query")
    else:
        query = encode(
            texts.assign(label=predicted_labels(loaded, args.query, args.max_length)),
            loaded.tokenizer,
            loaded.kind,
            format="classification",
            max_length=args.max_length,
            name="--query",
        )
    return ScoreData(train, query, "--query", frame)


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


def train_key(args: ScoreArgs, data: ScoreData) -> str:
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
    for example in data.train.examples:
        digest.update(json.dumps(example, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def fit_or_reuse(engine: InfluenceEngine, args: ScoreArgs, data: ScoreData, train_loader: DataLoader) -> str:
    """Load ``--out/fit`` when it was fitted on these training rows and holds every method's sums; else fit
    (resumable) and save it. Returns what was done, for the summary."""
    folder, key = args.out / "fit", train_key(args, data)
    key_file = folder / "train_key.json"
    if key_file.is_file() and json.loads(key_file.read_text()).get("key") == key:
        try:
            engine.load_fit(folder, train_loader=train_loader)
            for method in args.methods:
                engine.fitted.require(method)
            return f"reused the fit in {folder} (same model, blocks and --train rows)"
        except (FitMismatchError, NotFittedError) as why:
            reason = str(why).splitlines()[0]
            print(f"the fit in {folder} cannot be reused ({reason}): fitting again")
    checkpoint = args.out / "checkpoints" / "fit.ckpt"
    engine.fit(train_loader, methods=args.methods, checkpoint=checkpoint, checkpoint_every=20)
    key_file.unlink(missing_ok=True)
    engine.save_fit(folder)
    write_json(key_file, {"key": key})
    remove_if_empty(checkpoint.parent)
    return f"fitted and saved to {folder}"


def run_score(args: ScoreArgs) -> dict[str, Any]:
    """The ``hyperinf score`` job: load, fit (or reuse), score, write; returns the scores and the top-k."""
    check_args(args)
    assert args.model is not None
    started = time.perf_counter()
    loaded = load_model(model_folder(args.model), adapter=args.adapter, dtype=getattr(torch, args.model_dtype))
    data = load_data(args, loaded)
    blocks = parse_blocks(args.blocks) if args.blocks else default_blocks(loaded.model)
    engine = InfluenceEngine(
        loaded.model,
        task_of(loaded, args.loss_reduction),
        blocks=blocks,
        method=args.methods[0],
        **engine_options(args, cache_bytes=int(args.cache_gib * 2**30), spill_dir=str(args.out / "spill")),
    )
    for method in args.methods:
        engine.check_supports(method)
    for line in describe_plan(engine, data, args):
        print(line)
    train_loader = loader(data.train.examples, loaded.tokenizer, args.batch_size)
    target_loader = loader(data.target.examples, loaded.tokenizer, args.batch_size)
    fitted = fit_or_reuse(engine, args, data, train_loader)
    print(fitted)
    scored = engine.score_methods(train_loader, target_loader, list(args.methods))
    top = engine.top_k(train_loader, target_loader, k=min(args.k, len(data.train.examples)), method=args.methods[0])
    seconds = time.perf_counter() - started
    write_scores(args, data, {m: scored[m] for m in args.methods}, scored.train_loss, data.train_frame)
    write_top_k(args, data, top)
    write_json(
        args.out / "arguments.json",
        {
            "args": asdict(args),
            "sign": SIGN,
            "model_kind": loaded.kind,
            "format": data.train.format,
            "train": _data_record(data.train),
            "target": _data_record(data.target),
            "blocks": [{"name": b.name, "r": b.shape[0], "d": b.shape[1]} for b in engine.blocks],
            "fit": fitted,
            "seconds": seconds,
        },
    )
    print(
        f"scored {len(data.train.examples)} training rows against {len(data.target.examples)} target rows with "
        f"{', '.join(args.methods)} in {seconds:.0f} s; results written to {args.out}/"
    )
    return {"scores": {m: scored[m] for m in args.methods}, "top_k": top}


def _data_record(encoded: Encoded) -> dict[str, Any]:
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


def write_top_k(args: ScoreArgs, data: ScoreData, top: TopK) -> None:
    """top_k.jsonl: per target row (or query), its proponents (most helpful first) and opponents (most harmful first)."""

    def listed(indices: torch.Tensor, scores: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {"row": data.train.rows[j], "score": float(s), "text": data.train.texts[data.train.rows[j]]}
            for j, s in zip(indices.tolist(), scores.tolist())
        ]

    records = [
        {
            "target": target_row,
            "text": data.target.texts[target_row],
            "proponents": listed(top.helpful[i], top.helpful_scores[i]),
            "opponents": listed(top.harmful[i], top.harmful_scores[i]),
        }
        for i, target_row in enumerate(data.target.rows)
    ]
    write_jsonl(args.out / "top_k.jsonl", records)
