"""Query attribution: for given texts, the training examples that most helped and most hurt the model's answer.

The classifier is the one ``hyperinf mislabel`` fine-tunes (same options, same adapter cache), on
a built-in task or a user's table. Each query is scored under a label — the one given, or the
model's own prediction, which then explains that prediction — and :meth:`InfluenceEngine.top_k`
streams its ``k`` proponents (most negative scores: up-weighting them lowers the query's loss)
and opponents (most positive) out of the training set. With ``--index DIR`` the training gradients
are indexed once (:class:`hyperinf.index.GradientIndex`: one pass, no fit) and every later call
answers from the index, with one gradient per query and one matrix product.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hyperinf.app.arguments import add_options, from_namespace, method_name
from hyperinf.app.finetune import training_key
from hyperinf.app.minilm import classifier_logits
from hyperinf.app.mislabel import MislabelArgs, influence_engine, load_task, trained_seed
from hyperinf.app.textdata import TextDataset, report_skipped
from hyperinf.errors import DataError
from hyperinf.index import GradientIndex, check_index_method, index_methods, needs_kronecker
from hyperinf.results import write_json, write_jsonl
from hyperinf.scoring import TopK


@dataclass
class Query:
    """One query text and the label it is scored under (``predicted``: the model's own answer)."""

    text: str
    label: int
    predicted: bool


def read_queries(texts: list[str], query_file: Path | None) -> list[str]:
    """Query texts from ``--query`` options and a file with one text per line."""
    texts = list(texts)
    if query_file is not None:
        if not query_file.is_file():
            raise DataError(f"--query-file {query_file} does not exist: give a text file with one query per line")
        texts += [line.strip() for line in query_file.read_text().splitlines() if line.strip()]
    if not texts:
        raise DataError("no query to explain: pass --query TEXT (repeatable) or --query-file FILE (one text per line)")
    return texts


@torch.no_grad()
def label_queries(texts: list[str], label: str | None, label_names: list[str], model: Any, loader: Any) -> list[Query]:
    """Attach ``label`` (a class name) to every query, or the model's prediction when ``label`` is None."""
    if label is not None:
        if label not in label_names:
            raise DataError(f"--query-label {label!r} is not a class of the task; classes: {', '.join(label_names)}")
        return [Query(t, label_names.index(label), predicted=False) for t in texts]
    probe = loader(TextDataset(texts, torch.zeros(len(texts), dtype=torch.long), label_names))
    predictions = torch.cat([classifier_logits(model, batch).argmax(-1) for batch in probe]).tolist()
    return [Query(t, p, predicted=True) for t, p in zip(texts, predictions)]


def explain(
    args: MislabelArgs,
    texts: list[str],
    *,
    label: str | None = None,
    k: int = 5,
    data: TextDataset | None = None,
    index: Path | None = None,
    dim: int = 8192,
) -> list[dict[str, Any]]:
    """Train (or load) the task's model, then each query's ``k`` proponents and opponents, as records.
    ``data``: the task's rows, when already read; ``index``: a folder where the training gradients are indexed
    (``dim`` projected coordinates per row; built on first use, resumed if cut short, then reused)."""
    if index is not None:
        check_index_method(args.methods[0])
    data = data if data is not None else load_task(args)
    seed = trained_seed(args, data)
    queries = label_queries(texts, label, data.label_names, seed.model, seed.loader)
    engine = influence_engine(args, seed)
    train_loader = seed.loader(seed.split.train)
    query_set = TextDataset([q.text for q in queries], torch.tensor([q.label for q in queries]), data.label_names)
    if index is None:
        engine.fit(train_loader)
        top = engine.top_k(train_loader, seed.loader(query_set), k=k)
    else:
        rows = training_key({}, zip(seed.split.train.texts, seed.split.train.labels.tolist()))
        kronecker = needs_kronecker(args.methods[0])
        indexed = GradientIndex.build(engine, train_loader, index, dim=dim, source=rows, kronecker=kronecker)
        top = indexed.top_k(engine, seed.loader(query_set), k=min(k, len(indexed)))
    return [_record(i, q, top, seed.split, data.label_names) for i, q in enumerate(queries)]


def _record(i: int, query: Query, top: TopK, split: Any, names: list[str]) -> dict[str, Any]:
    def rows(indices: torch.Tensor, scores: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {
                "train_index": int(j),
                "score": float(s),
                "text": split.train.texts[j],
                "label": names[int(split.train.labels[j])],
                "flipped": bool(split.flipped[j]),
            }
            for j, s in zip(indices[i].tolist(), scores[i].tolist())
        ]

    return {
        "query": query.text,
        "label": names[query.label],
        "label_is_prediction": query.predicted,
        "proponents": rows(top.helpful, top.helpful_scores),
        "opponents": rows(top.harmful, top.harmful_scores),
    }


def print_records(records: list[dict[str, Any]], width: int = 90) -> None:
    """Each query, then its proponents and opponents: score, label (``*`` = a flipped label), text on one line."""
    for record in records:
        source = "the model's prediction" if record["label_is_prediction"] else "given"
        print(f"\nquery: {_one_line(record['query'], width)}\n  label: {record['label']} ({source})")
        for title, key in (
            ("proponents (helpful: up-weighting lowers the query's loss)", "proponents"),
            ("opponents (harmful: up-weighting raises the query's loss)", "opponents"),
        ):
            print(f"  {title}")
            for row in record[key]:
                mark = "*" if row["flipped"] else " "
                print(f"    {row['score']:+10.3g}  {row['label'][:12]:>12}{mark} {_one_line(row['text'], width)}")


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf explain`` options: the queries and the method, then mislabel's data and training options."""
    parser.add_argument("--query", action="append", default=[], help="a text to explain (repeatable)")
    parser.add_argument("--query-file", type=Path, default=None, help="a text file with one query per line")
    parser.add_argument(
        "--query-label", default=None, help="score every query under this class (default: the model's prediction)"
    )
    parser.add_argument("-k", "--k", type=int, default=5, help="proponents and opponents per query (default: 5)")
    parser.add_argument(
        "--method",
        type=method_name,
        default="hyperinf",
        help="influence method (default: hyperinf; see `hyperinf methods`)",
    )
    parser.add_argument(
        "--index",
        type=Path,
        default=None,
        help="a folder for a gradient index of the training rows: built on the first call (one pass, no fit), "
        f"then every call answers from it in milliseconds (methods: {', '.join(index_methods())})",
    )
    parser.add_argument(
        "--dim",
        type=int,
        default=8192,
        help="with --index: projected coordinates per training row; 0 keeps the gradients whole (default: 8192)",
    )
    add_options(parser, MislabelArgs, skip=("methods", "fim"), flip_fraction=0.0, out=Path("runs/explain"))


def run_explain(
    args: MislabelArgs,
    texts: list[str],
    *,
    label: str | None = None,
    k: int = 5,
    index: Path | None = None,
    dim: int = 8192,
) -> list[dict[str, Any]]:
    """The ``hyperinf explain`` job: read the task, explain every query, print and write the records."""
    data = load_task(args)
    report_skipped(data, args.task)
    records = explain(args, texts, label=label, k=k, data=data, index=index, dim=dim)
    print_records(records)
    write_jsonl(args.out / "explanations.jsonl", records)
    settings = {
        "args": asdict(args),
        "k": k,
        "query_label": label,
        "index": {"folder": str(index), "dim": dim} if index is not None else None,
        "skipped_rows": {"task": data.skipped},
    }
    write_json(args.out / "arguments.json", settings)
    print(f"\n{len(records)} explanation(s) written to {args.out}/explanations.jsonl (* = a flipped training label)")
    return records


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf explain`` from parsed arguments."""
    args = from_namespace(MislabelArgs, ns, methods=(ns.method,))
    if ns.k < 1:
        raise DataError(f"-k {ns.k}: ask for at least one proponent and opponent per query")
    if ns.index is not None and ns.dim < 0:
        raise DataError(f"--dim {ns.dim}: must be at least 0 (0 keeps the gradients whole)")
    run_explain(args, read_queries(ns.query, ns.query_file), label=ns.query_label, k=ns.k, index=ns.index, dim=ns.dim)
    return 0
