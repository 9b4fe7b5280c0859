"""The ``hyperinf`` command line: the product commands and the paper's experiments under one parser.

The one module above all three layers: it joins the product layer (:mod:`hyperinf.app`) and the
paper layer (:mod:`hyperinf.paper`), which do not import each other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hyperinf import __version__
from hyperinf.app.commands import add_commands
from hyperinf.errors import HyperinfError
from hyperinf.paper.commands import add_experiments

DEBUG_HELP = "show the Python traceback of any error (by default an error on your input prints one line)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperinf",
        description="Influence-function data attribution with HyperINF (GFIM + Schulz) and its baselines.",
    )
    parser.add_argument("--version", action="version", version=f"hyperinf {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(commands)
    add_experiments(commands)
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
