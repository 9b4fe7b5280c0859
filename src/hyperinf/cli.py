"""The ``hyperinf`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hyperinf import __version__
from hyperinf.errors import HyperinfError
from hyperinf.methods import method_names

DEBUG_HELP = "show the Python traceback of any error (by default an error on your input prints one line)"


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


def _explain(ns: argparse.Namespace) -> int:
    from hyperinf.experiments.explain import main as explain_main

    _method_list(ns.method)
    return explain_main(ns)


def _add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    from hyperinf.experiments.explain import add_arguments

    add_arguments(parser)


def _select(ns: argparse.Namespace) -> int:
    from hyperinf.experiments.select import main as select_main

    return select_main(ns)


def _select_study(ns: argparse.Namespace) -> int:
    from hyperinf.experiments.select_study import main as study_main

    if ns.methods:
        _method_list(ns.methods)
    return study_main(ns)


def _methods(ns: argparse.Namespace) -> int:
    from hyperinf import methods

    print(methods.__doc__)
    return 0


def _method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in method_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(method_names())}")
    return names


def _experiment(args_class: type, run: Callable[[Any], Any], full: dict[str, Any]) -> Callable[[argparse.Namespace], int]:
    """Handler of one ``experiment`` subcommand: its options become ``args_class`` fields by name;
    ``--full`` overrides the fields in ``full``."""

    def handler(ns: argparse.Namespace) -> int:
        names = {f.name for f in dataclasses.fields(args_class)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items() if k in names}
        values["progress"] = not ns.no_progress
        run(args_class(**(values | full if ns.full else values)))
        return 0

    return handler


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 512,1024; got {text!r}")
    return values


def _names_from(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A parser of comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [m.strip() for m in text.split(",") if m.strip()]
        unknown = [m for m in names if m not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown name(s) {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def _add_common_options(
    parser: argparse.ArgumentParser, name: str, methods: Sequence[str], dims: Sequence[int], dtype: str
) -> None:
    """Options both synthetic-matrix experiments share: output, sizes, methods, precision, device."""
    parser.add_argument("--out", type=Path, default=Path(f"runs/{name}"), help=f"output folder (default: runs/{name})")
    default_dims = ",".join(map(str, dims))
    parser.add_argument("--dims", type=_int_list, default=list(dims), help=f"matrix sizes d (default: {default_dims})")
    parser.add_argument(
        "--methods", type=_names_from(list(methods)), default=list(methods),
        help=f"comma-separated methods (default: all: {','.join(methods)})",
    )  # fmt: skip
    parser.add_argument("--lam", type=float, default=0.01, help="damping lambda (default: 0.01)")
    dtypes = [dtype, *({"float32", "float64"} - {dtype})]
    parser.add_argument("--dtype", choices=dtypes, default=dtype, help=f"working precision (default: {dtype})")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda; timers synchronise (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_experiments(commands: argparse._SubParsersAction) -> None:
    """``hyperinf experiment convergence``, ``inverse`` (paper Sec. 4, App. H-I), ``select`` (Sec. 5.2), ``lds``, ``logo`` (App. E.2) and ``epochs``."""
    from hyperinf.experiments import convergence, inverse
    from hyperinf.experiments.synthetic import DISTRIBUTIONS

    experiment = commands.add_parser(
        "experiment",
        help="reproduce the paper's experiments (CSV + PNG + arguments.json in an output folder)",
        description="Reproduce one of the paper's experiments; each writes a CSV of every measurement, "
        "PNG figures and its arguments as JSON into --out, and prints a summary table.",
    )
    kinds = experiment.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")

    conv = kinds.add_parser(
        "convergence",
        help="error per iteration of Schulz, LiSSA, DataInf, Neumann, SOR on synthetic M (Fig. 1, App. I)",
        description="Approximate M^{-1} v for M = (1/N) sum_i s_i s_i^T + lambda I with every method and "
        "record the error at every iteration, over a grid of d, N and five distributions of s and v. "
        "The default grid (d = 512, 1024) takes a few minutes on 2 CPU cores; --full adds d = 2048, 4096.",
    )
    _add_common_options(conv, "convergence", convergence.METHODS, convergence.DEFAULT_DIMS, "float64")
    conv.add_argument("--full", action="store_true", help="the paper's whole grid, d = 512,1024,2048,4096 (hours on CPU)")
    conv.add_argument("--sizes", type=_int_list, default=list(convergence.SIZES), help="sample counts N (default: 200,800,6400,12800)")
    conv.add_argument(
        "--distributions",
        type=_names_from(list(DISTRIBUTIONS)),
        default=list(DISTRIBUTIONS),
        help=f"entry distributions of s and v, normal-MEAN-STD or uniform-LOW-HIGH (default: all: {','.join(DISTRIBUTIONS)})",
    )
    conv.add_argument("--max-iter", type=int, default=40, help="iterations recorded per method (default: 40)")
    conv.add_argument("--seed", type=int, default=0, help="seed of the random s_i and v (default: 0)")
    conv.set_defaults(run=_experiment(convergence.ConvergenceArgs, convergence.run_convergence, {"dims": convergence.FULL_DIMS}))

    inv = kinds.add_parser(
        "inverse",
        help="error and time of GE, CG, GMRES, torch.linalg.inv, Cholesky, Schulz (Tables 9-10)",
        description="Invert M = (1/N) sum_i s_i s_i^T + lambda I (s ~ N(0,1), N = 12800) with every method "
        "for each d and seed; report the relative Frobenius error against a float64 reference and the "
        "time, mean ± std over seeds. A method predicted to exceed --time-budget at a size is skipped there.",
    )
    _add_common_options(inv, "inverse", inverse.METHODS, inverse.DIMS, "float32")
    inv.add_argument("--n", type=int, default=12800, help="samples N in M (default: 12800)")
    inv.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="seeds, one matrix each (default: 0,1,2)")
    inv.add_argument("--iterations", type=int, default=20, help="iterations of CG, GMRES and schulz-20 (default: 20)")
    inv.add_argument(
        "--time-budget", type=float, default=60.0,
        help="skip a method at sizes where its time, extrapolated as d^3, exceeds this many seconds (default: 60)",
    )  # fmt: skip
    inv.add_argument("--full", action="store_true", help="no time budget: run every method at every size")
    inv.set_defaults(run=_experiment(inverse.InverseArgs, inverse.run_inverse, {"time_budget": math.inf}))

    from hyperinf.experiments import epochs, lds, logo, select_study

    for name, module, run, summary, description in (
        ("select", select_study, _select_study,
         "data selection for fine-tuning: influence vs random, training loss and LESS (Tables 3-4)",
         "Warm the model up on a candidate pool, score the pool against a target set with every "
         "method, keep the top 5/20/40 percent, continue training on each selection and report test accuracy "
         "beside random selections, the full pool, the lowest training loss and LESS's gradient cosine."),
        ("lds", lds, lds.main,
         "linear datamodeling score: influence against retraining on random half subsets (Park et al. 2023)",
         "Retrain the model on --subsets random halves of the training set (cached) and, for every method "
         "and damping, report the mean over query examples of Spearman's correlation between a subset's summed "
         "influence scores and the query's loss after retraining on it, with a bootstrap 95% interval."),
        ("logo", logo, logo.main,
         "leave one group out: retraining without each fifth of the ranked training set (App. E.2, Table 6)",
         "Per seed, rank the training set by each method's scores, cut it into --groups equal groups, retrain "
         "without each (cached) and report Spearman's correlation between the groups' mean scores and the drop of the "
         "mean validation loss, mean ± std over --seeds, beside the paper's Table 6."),
        ("epochs", epochs, epochs.main,
         "memorisation: mislabel detection's ROC-AUC per training epochs, beside the training loss's",
         "Run the mislabel pipeline (tweets, --flip-fraction flipped) once per --epochs-list entry, each its own "
         "cached adapter, and report every method's ROC-AUC and the training-loss ranking's per epoch count."),
    ):  # fmt: skip
        parser = kinds.add_parser(name, help=summary, description=description)
        module.add_arguments(parser)
        parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperinf",
        description="Influence-function data attribution with HyperINF (GFIM + Schulz) and its baselines.",
    )
    parser.add_argument("--version", action="version", version=f"hyperinf {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
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
    from hyperinf.experiments.select import add_arguments as add_select_arguments

    add_select_arguments(select)
    select.set_defaults(run=_select)

    methods = commands.add_parser("methods", help="list the influence methods", description="List the influence methods.")
    methods.set_defaults(run=_methods)
    _add_experiments(commands)
    _accept_debug_after_subcommands(parser)
    return parser


def _accept_debug_after_subcommands(parser: argparse.ArgumentParser) -> None:
    """Let ``--debug`` also follow a subcommand (``hyperinf mislabel ... --debug``), at every depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                # SUPPRESS: a subcommand without --debug leaves the top-level value alone.
                child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                _accept_debug_after_subcommands(child)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; an error on the user's input prints ``hyperinf: error: ...`` and returns 2.

    Any other exception is a bug and keeps its traceback; ``--debug`` shows the traceback of both.
    """
    ns = build_parser().parse_args(argv)
    try:
        return ns.run(ns)
    except HyperinfError as error:
        if ns.debug:
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"hyperinf: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
