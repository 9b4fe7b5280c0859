"""Parsers of command-line values the commands share: comma-separated method names, integers, names."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from hyperinf.methods import method_names


def method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in method_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or text!r}; choose from {', '.join(method_names())}"
        )
    return names


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 512,1024; got {text!r}")
    return values


def names_from(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A parser of comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [m.strip() for m in text.split(",") if m.strip()]
        unknown = [m for m in names if m not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown name(s) {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse
