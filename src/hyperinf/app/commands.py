"""The product commands of ``hyperinf``: demo, mislabel, explain, select and methods, each a subparser."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperinf.app.arguments import method_list


def _demo(ns: argparse.Namespace) -> int:
    from hyperinf.app.demo import DemoArgs, run_demo

    run_demo(
        DemoArgs(
            out=ns.out,
            n_train=ns.n_train,
            n_val=ns.n_val,
            flip_fraction=ns.flip_fraction,
            epochs=ns.epochs,
            seed=ns.seed,
            methods=tuple(ns.methods),
            progress=not ns.no_progress,
        )
    )
    return 0


def _mislabel(ns: argparse.Namespace) -> int:
    from hyperinf.app.mislabel import main as mislabel_main

    ns.methods = method_list(ns.methods)
    return mislabel_main(ns)


def _add_mislabel_arguments(parser: argparse.ArgumentParser) -> None:
    from hyperinf.app.mislabel import add_arguments

    add_arguments(parser)


def _explain(ns: argparse.Namespace) -> int:
    from hyperinf.app.explain import main as explain_main

    method_list(ns.method)
    return explain_main(ns)


def _add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    from hyperinf.app.explain import add_arguments

    add_arguments(parser)


def _select(ns: argparse.Namespace) -> int:
    from hyperinf.app.select import main as select_main

    return select_main(ns)


def _methods(ns: argparse.Namespace) -> int:
    from hyperinf import methods

    print(methods.__doc__)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the product commands to the ``hyperinf`` parser's subcommands."""

    demo = commands.add_parser(
        "demo",
        help="find flipped labels in scikit-learn's digits with every method (small, CPU, seconds)",
        description="Train an MLP on digits with flipped training labels, score every training "
        "example with each method and print how many flipped labels each finds.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    demo.add_argument("--n-train", type=int, default=1000, help="training examples (default: 1000)")
    demo.add_argument("--n-val", type=int, default=200, help="clean validation examples (default: 200)")
    demo.add_argument(
        "--flip-fraction", type=float, default=0.2, help="share of flipped training labels (default: 0.2)"
    )
    demo.add_argument("--epochs", type=int, default=200, help="full-batch training steps (default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of split, flips and training (default: 0)")
    demo.add_argument(
        "--methods",
        type=method_list,
        default=["hyperinf", "hyperinf-fim", "exact", "exact-fim", "datainf", "lissa", "tracin"],
        help="comma-separated methods (default: all but exact-hessian)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)

    mislabel = commands.add_parser(
        "mislabel",
        help="find flipped labels in a fine-tuned transformer's training data (paper Sec. 5.1)",
        description="Flip a share of the training labels, fine-tune the shipped MiniLM with rsLoRA, "
        "score every training example with each method and report how many flipped labels each finds.",
    )
    _add_mislabel_arguments(mislabel)
    mislabel.set_defaults(run=_mislabel)

    explain = commands.add_parser(
        "explain",
        help="the training examples that most helped and most hurt the model's answer on given texts",
        description="Fine-tune (or load) the classifier `hyperinf mislabel` uses on --task, then print for each "
        "--query its k proponents (most helpful training examples) and opponents (most harmful), with text, "
        "label and score; written to --out/explanations.jsonl.",
    )
    _add_explain_arguments(explain)
    explain.set_defaults(run=_explain)

    select = commands.add_parser(
        "select",
        help="keep the pool examples that most help a target set (data selection for fine-tuning)",
        description="Warm the model up on the candidate pool (LoRA, one epoch, cached), score every pool example "
        "against the target set and write scores.parquet, selected_<pct>.jsonl per --fraction (most helpful "
        "first) and arguments.json into --out.",
    )
    from hyperinf.app.select import add_arguments as add_select_arguments

    add_select_arguments(select)
    select.set_defaults(run=_select)

    methods = commands.add_parser(
        "methods", help="list the influence methods", description="List the influence methods."
    )
    methods.set_defaults(run=_methods)
