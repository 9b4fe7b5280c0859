"""``hyperinf experiment ...``: the paper's reproductions as subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hyperinf.app.arguments import from_namespace, int_list, names_from, output_path


def _experiment(
    args_class: type, run: Callable[[Any], Any], full: dict[str, Any]
) -> Callable[[argparse.Namespace], int]:
    """Handler of one ``experiment`` subcommand: its options become ``args_class`` fields by name;
    ``--full`` overrides the fields in ``full``."""

    def handler(ns: argparse.Namespace) -> int:
        args = from_namespace(args_class, ns)
        run(dataclasses.replace(args, **full) if ns.full else args)
        return 0

    return handler


def _add_common_options(
    parser: argparse.ArgumentParser, name: str, methods: Sequence[str], dims: Sequence[int], dtype: str
) -> None:
    """Options both synthetic-matrix experiments share: output, sizes, methods, precision, device."""
    parser.add_argument(
        "--out", type=output_path, default=Path(f"runs/{name}"), help=f"output folder (default: runs/{name})"
    )
    default_dims = ",".join(map(str, dims))
    parser.add_argument("--dims", type=int_list, default=tuple(dims), help=f"matrix sizes d (default: {default_dims})")
    parser.add_argument(
        "--methods",
        type=names_from(list(methods)),
        default=tuple(methods),
        help=f"comma-separated methods (default: all: {','.join(methods)})",
    )
    parser.add_argument("--lam", type=float, default=0.01, help="damping lambda (default: 0.01)")
    dtypes = [dtype, *({"float32", "float64"} - {dtype})]
    parser.add_argument("--dtype", choices=dtypes, default=dtype, help=f"working precision (default: {dtype})")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda; timers synchronise (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's default)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def add_experiments(commands: argparse._SubParsersAction) -> None:
    """``hyperinf experiment convergence``, ``inverse`` (paper Sec. 4, App. H-I), ``select`` (Sec. 5.2), ``lds``, ``logo`` (App. E.2) and ``epochs``."""
    from hyperinf.paper import convergence, inverse
    from hyperinf.paper.synthetic import DISTRIBUTIONS

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
        "The default grid is d = 512, 1024; --full adds d = 2048, 4096.",
    )
    _add_common_options(conv, "convergence", convergence.METHODS, convergence.DEFAULT_DIMS, "float64")
    conv.add_argument(
        "--full", action="store_true", help="the paper's whole grid, d = 512,1024,2048,4096 (hours on CPU)"
    )
    conv.add_argument(
        "--sizes", type=int_list, default=tuple(convergence.SIZES), help="sample counts N (default: 200,800,6400,12800)"
    )
    conv.add_argument(
        "--distributions",
        type=names_from(list(DISTRIBUTIONS)),
        default=tuple(DISTRIBUTIONS),
        help=f"entry distributions of s and v, normal-MEAN-STD or uniform-LOW-HIGH (default: all: {','.join(DISTRIBUTIONS)})",
    )
    conv.add_argument("--max-iter", type=int, default=40, help="iterations recorded per method (default: 40)")
    conv.add_argument("--seed", type=int, default=0, help="seed of the random s_i and v (default: 0)")
    conv.set_defaults(
        run=_experiment(convergence.ConvergenceArgs, convergence.run_convergence, {"dims": convergence.FULL_DIMS})
    )

    inv = kinds.add_parser(
        "inverse",
        help="error and time of GE, CG, GMRES, torch.linalg.inv, Cholesky, Schulz (Tables 9-10)",
        description="Invert M = (1/N) sum_i s_i s_i^T + lambda I (s ~ N(0,1), N = 12800) with every method "
        "for each d and seed; report the relative Frobenius error against a float64 reference and the "
        "time, mean ± std over seeds. A method predicted to exceed --time-budget at a size is skipped there.",
    )
    _add_common_options(inv, "inverse", inverse.METHODS, inverse.DIMS, "float32")
    inv.add_argument("--n", type=int, default=12800, help="samples N in M (default: 12800)")
    inv.add_argument("--seeds", type=int_list, default=(0, 1, 2), help="seeds, one matrix each (default: 0,1,2)")
    inv.add_argument("--iterations", type=int, default=20, help="iterations of CG, GMRES and schulz-20 (default: 20)")
    inv.add_argument(
        "--time-budget",
        type=float,
        default=60.0,
        help="skip a method at sizes where its time, extrapolated as d^3, exceeds this many seconds (default: 60)",
    )
    inv.add_argument("--full", action="store_true", help="no time budget: run every method at every size")
    inv.set_defaults(run=_experiment(inverse.InverseArgs, inverse.run_inverse, {"time_budget": math.inf}))

    from hyperinf.paper import epochs, lds, logo, select_study, vlm_select

    for name, module, run, summary, description in (
        (
            "select",
            select_study,
            select_study.main,
            "data selection for fine-tuning: influence vs random, training loss and LESS (Tables 3-4)",
            "Warm the model up on a candidate pool, score the pool against a target set with every "
            "method, keep the top 5/20/40 percent, continue training on each selection and report test accuracy "
            "beside random selections, the full pool, the lowest training loss and LESS's gradient cosine.",
        ),
        (
            "vlm-select",
            vlm_select,
            vlm_select.main,
            "instruction-data selection for a vision-language model (Sec. 5.3, Tables 5 and 8)",
            "Pretrain a small ViT on MNIST digit grids, assemble a LLaVA model with SmolLM2, align it on captions "
            "(--setting after-alignment) or not (before-alignment), score an instruction pool of four question "
            "families with every method, keep the top 5/20/40 percent, instruction-tune on each selection and "
            "report exact-match accuracy per family beside random selections, the full pool, LESS and RDS+.",
        ),
        (
            "lds",
            lds,
            lds.main,
            "linear datamodeling score: influence against retraining on random half subsets (Park et al. 2023)",
            "Retrain the model on --subsets random halves of the training set (cached) and, for every method "
            "and damping, report the mean over query examples of Spearman's correlation between a subset's summed "
            "influence scores and the query's loss after retraining on it, with a bootstrap 95% interval.",
        ),
        (
            "logo",
            logo,
            logo.main,
            "leave one group out: retraining without each fifth of the ranked training set (App. E.2, Table 6)",
            "Per seed, rank the training set by each method's scores, cut it into --groups equal groups, retrain "
            "without each (cached) and report Spearman's correlation between the groups' mean scores and the drop of the "
            "mean validation loss, mean ± std over --seeds, beside the paper's Table 6.",
        ),
        (
            "epochs",
            epochs,
            epochs.main,
            "memorisation: mislabel detection's ROC-AUC per training epochs, beside the training loss's",
            "Run the mislabel pipeline (tweets, --flip-fraction flipped) once per --epochs-list entry, each its own "
            "cached adapter, and report every method's ROC-AUC and the training-loss ranking's per epoch count.",
        ),
    ):
        parser = kinds.add_parser(name, help=summary, description=description)
        module.add_arguments(parser)
        parser.set_defaults(run=run)
