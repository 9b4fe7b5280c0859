"""The product commands of ``hyperinf``: demo, score, index, mislabel, explain, select and methods, each a subparser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType

from hyperinf.app.arguments import add_options, from_namespace


def _demo(ns: argparse.Namespace) -> int:
    from hyperinf.app.demo import DemoArgs, run_demo

    run_demo(from_namespace(DemoArgs, ns))
    return 0


def _main_of(module: ModuleType) -> Callable[[argparse.Namespace], int]:
    """A handler running ``module.main``, looked up when the command runs."""

    def run(ns: argparse.Namespace) -> int:
        return module.main(ns)

    return run


def _methods(ns: argparse.Namespace) -> int:
    from hyperinf import methods

    print(methods.__doc__)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the product commands to the ``hyperinf`` parser's subcommands."""
    from hyperinf.app import explain, index, mislabel, score, select
    from hyperinf.app.demo import DemoArgs

    demo = commands.add_parser(
        "demo",
        help="find flipped labels in scikit-learn's digits with every method (small, CPU, seconds)",
        description="Train an MLP on digits with flipped training labels, score every training "
        "example with each method and print how many flipped labels each finds.",
    )
    add_options(demo, DemoArgs)
    demo.set_defaults(run=_demo)

    for name, module, summary, description in (
        (
            "score",
            score,
            "which training rows of your model's data helped or hurt its answers (your model folder, adapter, data)",
            "Load a model saved with save_pretrained (and a peft adapter), score every --train row against the "
            "--target rows (or --query texts) with each method, no training, and write scores.parquet, top_k.jsonl "
            "(each target's proponents and opponents), arguments.json and the fit into --out.",
        ),
        (
            "index",
            index,
            "index your model's training rows once (projected, preconditioned gradients), then query it in milliseconds",
            "index build: store every --train row's preconditioned gradient, randomly projected, for a model saved "
            "with save_pretrained (and a peft adapter). index query: each --target row's (or --query text's) "
            "proponents and opponents among the indexed rows, from one gradient and one matrix product.",
        ),
        (
            "mislabel",
            mislabel,
            "find flipped labels in a fine-tuned transformer's training data (paper Sec. 5.1)",
            "Flip a share of the training labels, fine-tune the shipped MiniLM with rsLoRA, "
            "score every training example with each method and report how many flipped labels each finds.",
        ),
        (
            "explain",
            explain,
            "the training examples that most helped and most hurt the model's answer on given texts",
            "Fine-tune (or load) the classifier `hyperinf mislabel` uses on --task, then print for each "
            "--query its k proponents (most helpful training examples) and opponents (most harmful), with text, "
            "label and score; written to --out/explanations.jsonl.",
        ),
        (
            "select",
            select,
            "keep the pool examples that most help a target set (data selection for fine-tuning)",
            "Warm the model up on the candidate pool (LoRA, one epoch, cached), score every pool example "
            "against the target set and write scores.parquet, selected_<pct>.jsonl per --fraction (most helpful "
            "first) and arguments.json into --out.",
        ),
    ):
        parser = commands.add_parser(name, help=summary, description=description)
        module.add_arguments(parser)
        parser.set_defaults(run=_main_of(module))

    methods = commands.add_parser(
        "methods", help="list the influence methods", description="List the influence methods."
    )
    methods.set_defaults(run=_methods)
