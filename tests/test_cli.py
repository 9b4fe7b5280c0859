"""The command line: help on every subcommand, and the demo end to end on a small setting."""

import argparse
import json
import subprocess
import sys

import pytest

from hyperinf.cli import build_parser, main
from hyperinf.results import load_scores


def subcommands(parser=None, prefix=()) -> list[list[str]]:
    """Every subcommand path, nested ones included (``experiment``, ``experiment convergence``, ...)."""
    parser = parser or build_parser()
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths.append([*prefix, name])
                paths += subcommands(child, (*prefix, name))
    return paths


def test_nested_experiment_subcommands_are_listed():
    assert ["experiment", "convergence"] in subcommands() and ["experiment", "inverse"] in subcommands()


@pytest.mark.parametrize("command", [[], *subcommands()], ids=lambda c: " ".join(c) or "top")
def test_every_subcommand_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "hyperinf.cli", *command, "--help"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("usage: hyperinf")


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("hyperinf", "hyperinf-fim", "exact", "exact-fim", "exact-hessian", "datainf", "lissa", "tracin"):
        assert f"``{name}``" in out


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "hyperinf,schulz"])
    assert "unknown method" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--n-train", "300", "--epochs", "100", "--methods", "hyperinf,exact,tracin", "--no-progress"])
    printed = capsys.readouterr().out
    assert "clean test accuracy" in printed and "hyperinf" in printed
    report = json.loads((out / "detection.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"hyperinf", "exact", "tracin", "self-influence", "training loss", "random"}
    # HyperINF and exact invert the same damped GFIM: their rankings agree.
    assert rows["hyperinf"]["roc_auc"] == pytest.approx(rows["exact"]["roc_auc"], abs=1e-3)
    scores = load_scores(out)
    assert scores["score/hyperinf"].shape == (300,) and int(scores["labels/flipped"].sum()) == 60
