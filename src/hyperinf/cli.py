"""The ``hyperinf`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hyperinf import __version__
from hyperinf.methods import METHODS


def _demo(ns: argparse.Namespace) -> int:
    from hyperinf.experiments.demo import DemoArgs, run_demo

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
    from hyperinf.experiments.mislabel import main as mislabel_main

    ns.methods = _method_list(ns.methods)
    return mislabel_main(ns)


def _add_mislabel_arguments(parser: argparse.ArgumentParser) -> None:
    from hyperinf.experiments.mislabel import add_arguments

    add_arguments(parser)


def _methods(ns: argparse.Namespace) -> int:
    from hyperinf import methods

    print(methods.__doc__)
    return 0


def _method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperinf",
        description="Influence-function data attribution with HyperINF (GFIM + Schulz) and its baselines.",
    )
    parser.add_argument("--version", action="version", version=f"hyperinf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="find flipped labels in scikit-learn's digits with every method (small, CPU, seconds)",
        description="Train an MLP on digits with flipped training labels, score every training "
        "example with each method and print how many flipped labels each finds.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    demo.add_argument("--n-train", type=int, default=1000, help="training examples (default: 1000)")
    demo.add_argument("--n-val", type=int, default=200, help="clean validation examples (default: 200)")
    demo.add_argument("--flip-fraction", type=float, default=0.2, help="share of flipped training labels (default: 0.2)")
    demo.add_argument("--epochs", type=int, default=200, help="full-batch training steps (default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of split, flips and training (default: 0)")
    demo.add_argument(
        "--methods",
        type=_method_list,
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

    methods = commands.add_parser("methods", help="list the influence methods", description="List the influence methods.")
    methods.set_defaults(run=_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.run(ns)


if __name__ == "__main__":
    sys.exit(main())
