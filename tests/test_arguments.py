"""The argument layer: dataclass fields -> options -> dataclass, its parsers, and which options enter each cache key."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import hyperinf.app.select
import hyperinf.paper.retraining
from hyperinf.app.arguments import (
    add_options,
    check_methods,
    engine_options,
    float_list,
    from_namespace,
    int_list,
    key_settings,
    method_list,
    names_from,
    option,
    override,
)
from hyperinf.cli import build_parser, main
from hyperinf.errors import ConfigurationError
from hyperinf.methods import method_names


@dataclass
class Example:
    size: int = option(3, key="training", help="size (default: %(default)s)")
    rate: float = option(0.5, engine=True, help="rate (default: %(default)s)")
    name: str = option("a", choices=("a", "b"), help="name")
    shares: tuple[float, ...] = option(
        (0.05, 0.2), flag="--share", parse=float_list, help="shares (default: %(default)s)"
    )
    methods: tuple[str, ...] = option(("hyperinf",), parse=method_list, help="methods (default: %(default)s)")
    folder: Path | None = option(None, parse=Path, help="folder")
    fast: bool = option(False, help="go fast")
    checked: bool = option(True, flag="--unchecked", help="skip the check")
    hidden: int = 7  # a setting without an option


@dataclass
class Derived(Example):
    size: int = override(Example, "size", default=4, flag="--n", help="n (default: %(default)s)")


def parser_of(cls: type, **options: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add_options(parser, cls, **options)
    return parser


def test_fields_become_options_and_parse_back_into_the_dataclass():
    parser = parser_of(Example)
    assert from_namespace(Example, parser.parse_args([])) == Example()
    argv = "--size 5 --rate 1e-3 --name b --share 0.1,0.3 --methods tracin,exact --folder x --fast --unchecked"
    assert from_namespace(Example, parser.parse_args(argv.split())) == Example(
        size=5,
        rate=0.001,
        name="b",
        shares=(0.1, 0.3),
        methods=("tracin", "exact"),
        folder=Path("x"),
        fast=True,
        checked=False,
    )
    assert from_namespace(Example, parser.parse_args([]), hidden=9).hidden == 9
    text = " ".join(parser.format_help().split())
    assert "--share SHARE shares (default: 0.05,0.2)" in text and "--size SIZE size (default: 3)" in text
    assert "--hidden" not in text and "--checked" not in text


def test_a_command_changes_defaults_skips_options_and_overrides_fields():
    parser = parser_of(Example, skip=("fast",), size=9)
    assert from_namespace(Example, parser.parse_args([])).size == 9
    assert "--fast" not in parser.format_help()
    derived = parser_of(Derived)
    assert from_namespace(Derived, derived.parse_args(["--n", "6"])).size == 6
    assert "n (default: 4)" in derived.format_help() and Derived().size == 4


def test_cache_key_fields_and_engine_options_come_from_the_metadata():
    assert key_settings(Example(size=2)) == {"size": 2}
    assert key_settings(Example(), "scores") == {}
    assert engine_options(Example(rate=0.1), spill_dir="x") == {"rate": 0.1, "spill_dir": "x"}


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (int_list, "1, 3,10", (1, 3, 10)),
        (float_list, "0.05,1e-3", (0.05, 0.001)),
        (names_from(["a", "b"]), "b,a", ("b", "a")),
        (method_list, "tracin,exact", ("tracin", "exact")),
    ],
)
def test_comma_lists(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (int_list, "1,x", "expected a comma-separated list, e.g. 1,3,10; got '1,x'"),
        (float_list, ",", "expected a comma-separated list"),
        (names_from(["a", "b"]), "a,c", "unknown name 'c'; choose from a, b"),
        (method_list, "hyperinf,schulz", f"unknown method 'schulz'; choose one of {', '.join(method_names())}"),
    ],
)
def test_a_bad_list_is_an_argparse_type_error(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


def test_method_names_are_checked_once_for_settings_built_in_python_too():
    assert check_methods(["tracin"]) == ("tracin",)
    with pytest.raises(ConfigurationError, match="no method given"):
        check_methods([])
    with pytest.raises(ConfigurationError, match="unknown method 'schulz'"):
        check_methods(["hyperinf", "schulz"])


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--methods", "hyperinf,schulz"],
        ["mislabel", "--methods", "hyperinf,schulz"],
        ["explain", "--method", "schulz"],
        ["select", "--method", "schulz"],
        ["experiment", "select", "--methods", "schulz"],
        ["experiment", "lds", "--methods", "schulz"],
        ["experiment", "logo", "--methods", "hyperinf,schulz"],
        ["experiment", "epochs", "--methods", "schulz"],
    ],
    ids=" ".join,
)
def test_a_bad_method_name_is_a_usage_error_naming_the_choices(capsys, argv):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hyperinf") and "Traceback" not in err
    command, option = " ".join(argv[:-2]), argv[-2]
    assert err.splitlines()[-1] == (
        f"hyperinf {command}: error: argument {option}: unknown method 'schulz'; "
        f"choose one of {', '.join(method_names())}"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["mislabel"],
        ["explain", "--query", "q"],
        ["select", "--model", "tiny-llama"],
        ["experiment", "select", "--model", "tiny-llama"],
        ["experiment", "epochs"],
    ],
    ids=" ".join,
)
def test_a_bad_influence_option_is_refused_before_any_data_is_read(tmp_path, capsys, argv):
    """The engine's options are checked when a command's settings are built: the missing --task is never reached,
    no model is trained and nothing is written."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    options = ["--task", str(tmp_path / "missing.csv"), "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    assert main([*argv, *options, "--damping", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "hyperinf: error: damping must be >= 0, got -1.0: pass 0 (undamped) or a positive factor (the default is 0.1)\n"
    )
    assert not out.exists() and not cache.exists()


def commands_with_out(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()) -> list[list[str]]:
    """Every subcommand that has an ``--out`` option, nested ones included."""
    found = []
    for action in (parser or build_parser())._actions:
        if "--out" in action.option_strings:
            found.append(list(path))
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += commands_with_out(child, (*path, name))
    return found


@pytest.mark.parametrize("command", commands_with_out(), ids=" ".join)
@pytest.mark.parametrize("under", [False, True], ids=["the file", "a folder under it"])
def test_an_out_that_is_a_file_is_a_usage_error_naming_it(tmp_path, capsys, command, under):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--out", str(afile / "results" if under else afile)])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        f"hyperinf {' '.join(command)}: error: argument --out: {afile} exists and is not a folder: "
        "pass a new or existing folder for the results"
    )
    assert afile.read_text() == "mine"
    assert subparser(command).parse_args(["--out", str(tmp_path)]).out == tmp_path  # an existing folder is fine


# Which options change which cache key, pinned by behaviour: each option of a command is set to another value on the
# real command line, and the cache keys of every model its run would train (and of select's scores) are compared.
TRAINING = {"--task", "--seed", "--model", "--rank", "--epochs", "--lr", "--batch-size", "--max-length"}
MISLABEL = TRAINING | {
    "--text-column",
    "--label-column",
    "--n-train",
    "--unbalanced",
    "--flip-fraction",
    "--last-layer",
}
WARM_UP = TRAINING | {"--dense"}
SCORES = WARM_UP | {"--damping", "--damping-mode", "--dtype"}
RETRAINING = {"--epochs", "--batch-size", "--seed"}  # beside the setting's own key (its data and model)

SPLIT = SimpleNamespace(train=SimpleNamespace(texts=["a b", "c", "d e f"], labels=torch.tensor([0, 1, 0])))
POOL = SimpleNamespace(pairs=lambda which: [("pool text", 1), ("x", 0)] if which == "pool" else [("target", 1)])
TRAINED: list[str] = []  # the cache files the fake training below was asked for


def fake_training(
    model: Any, loss: Any, examples: Any, collate: Any, schedule: Any, path: Path, **options: Any
) -> dict:
    TRAINED.append(path.name)
    return {"cached": True, "seconds": 0.0}


class Captured(Exception):
    """Raised in place of a command's run function, with what it was given."""


def mislabel_runs(args: Any, options: dict[str, Any]) -> list[Any]:
    """The settings of every adapter ``run_mislabel`` trains: each rank of the sweep, each seed."""
    ranks = options["ranks"] or (args.rank,)
    return [replace(args, rank=r, seed=args.seed + i) for r in ranks for i in range(options["seeds"])]


def epochs_runs(args: Any, options: dict[str, Any]) -> list[Any]:
    return [
        replace(args.run_args(epochs), seed=args.mislabel.seed + i)
        for epochs in args.epochs_list
        for i in range(args.seeds)
    ]


def seeds_runs(args: Any, options: dict[str, Any]) -> list[Any]:
    return [replace(args, seed=args.seed + i) for i in range(args.seeds)]


def training_key(args: Any) -> tuple[str, ...]:
    return (args.training_key(SPLIT),)


def selection_keys(methods: Any, per_target: Any) -> Any:
    """The warm-up's key and the scores' key of a selection run (``per_target(args)``: whether it scores per target)."""

    def keys(args: Any) -> tuple[str, ...]:
        learner = SimpleNamespace(model=None, loss=None, collate=None)
        warm = hyperinf.app.select.warm_up(args, learner, POOL.pairs("pool"))["key"]
        return warm, hyperinf.app.select.scores_path(args, POOL, methods(args), warm, per_target(args)).name

    return keys


def retraining_key(args: Any) -> tuple[str, ...]:
    """The cache file of the model trained on a fixed selection of a fixed setting (lds and logo's Trainer)."""
    setting = SimpleNamespace(
        train=[("0", 1), ("1", 0), ("2", 1)],
        key={"data": "fixed", "model": "fixed"},
        fresh_model=lambda seed: None,
        loss=None,
        collate=None,
        epochs=30,
        batch_size=64,
    )
    TRAINED.clear()
    hyperinf.paper.retraining.Trainer(args, setting).model(torch.arange(3), args.seed)
    return (TRAINED[0],)


def one_run(args: Any, options: dict[str, Any]) -> list[Any]:
    return [args]


GIVEN = {"--adapter", "--no-warmup"}  # a selection's model as given: in both keys, only when set

COMMANDS = {  # command line, run function, the runs it makes, the keys of a run, the options that change each key
    "mislabel": (
        ["mislabel"],
        "hyperinf.app.mislabel.run_mislabel",
        mislabel_runs,
        training_key,
        [MISLABEL | {"--ranks", "--seeds"}],
    ),
    "explain": (["explain", "--query", "q"], "hyperinf.app.explain.run_explain", one_run, training_key, [MISLABEL]),
    "epochs": (
        ["experiment", "epochs"],
        "hyperinf.paper.epochs.run_epochs",
        epochs_runs,
        training_key,
        [MISLABEL - {"--epochs"} | {"--epochs-list", "--seeds"}],
    ),
    "select": (
        ["select"],
        "hyperinf.app.select.run_select",
        one_run,
        selection_keys(lambda args: [args.method], lambda args: args.strategy == "per-target"),
        [WARM_UP | GIVEN, SCORES | GIVEN | {"--method", "--strategy"}],
    ),
    "experiment select": (
        ["experiment", "select"],
        "hyperinf.paper.select_study.run_study",
        seeds_runs,
        selection_keys(lambda args: list(args.methods), lambda args: not args.balance),
        [WARM_UP | {"--seeds"}, SCORES | {"--methods", "--seeds", "--balance"}],  # --balance: no per-target pass
    ),
    "lds": (["experiment", "lds"], "hyperinf.paper.lds.run_lds", one_run, retraining_key, [RETRAINING]),
    "logo": (
        ["experiment", "logo"],
        "hyperinf.paper.logo.run_logo",
        seeds_runs,
        retraining_key,
        [RETRAINING | {"--seeds"}],
    ),
}


def alternative_values(tmp_path: Path) -> dict[str, str]:
    """A value other than the default for every option that takes one."""
    queries = tmp_path / "queries.txt"
    queries.write_text("a query\n")
    return {
        "--task": "bbc",
        "--min-confidence": "0.5",
        "--text-column": "t",
        "--label-column": "l",
        "--n-train": "100",
        "--n-val": "50",
        "--n-test": "10",
        "--flip-fraction": "0.1",
        "--model": "tiny-bert",
        "--rank": "4",
        "--epochs": "2",
        "--lr": "5e-4",
        "--batch-size": "8",
        "--max-length": "32",
        "--seed": "3",
        "--damping": "0.5",
        "--damping-mode": "absolute",
        "--dtype": "float64",
        "--cache-dir": str(tmp_path / "cache"),
        "--out": str(tmp_path / "out"),
        "--methods": "tracin",
        "--method": "tracin",
        "--ranks": "2,4",
        "--seeds": "2",
        "--epochs-list": "1,2",
        "--target": str(tmp_path / "target.csv"),
        "--n-pool": "50",
        "--n-target": "5",
        "--fraction": "0.5",
        "--cache-gib": "1",
        "--variant": "noisy",
        "--continue-epochs": "1",
        "--random-draws": "1",
        "--setting": "bbc",
        "--n-query": "10",
        "--subsets": "5",
        "--retrain-seeds": "2",
        "--dampings": "0.5",
        "--index-dims": "0,64",
        "--groups": "3",
        "--query": "another query",
        "--query-file": str(queries),
        "--query-label": "pos",
        "--adapter": str(tmp_path / "adapter"),
        "--format": "classification",
        "--strategy": "per-target",
        "--k": "3",
        "--index": str(tmp_path / "index"),
        "--dim": "64",
    }


def subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        if name.startswith("-"):
            break
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


@pytest.mark.parametrize("command", list(COMMANDS))
def test_exactly_the_training_options_enter_each_cache_key(command, tmp_path, monkeypatch):
    argv, run, runs_of, keys_of, expected = COMMANDS[command]
    alternatives = alternative_values(tmp_path)
    if "select" in command:
        alternatives["--dtype"] = "float32"  # for SmolLM2 the default is float64
    monkeypatch.setattr(hyperinf.app.select, "train_or_load", fake_training)
    monkeypatch.setattr(hyperinf.paper.retraining, "train_or_load", fake_training)

    def stop(args: Any, *rest: Any, **options: Any) -> None:
        raise Captured(args, options)

    monkeypatch.setattr(run, stop)

    def keys(extra: list[str]) -> list[tuple[str, ...]]:
        """Per cache key, its values over the command's runs."""
        with pytest.raises(Captured) as caught:
            main([*argv, *extra])
        per_run = [keys_of(args) for args in runs_of(*caught.value.args)]
        return list(zip(*per_run))

    default = keys([])
    changed: list[set[str]] = [set() for _ in expected]
    for action in subparser(argv)._actions:
        flag = max(action.option_strings, key=len, default="")
        # --columns is read by rows of other formats only (tested in test_select)
        if flag in ("", "--help", "--debug", "--columns"):
            continue
        values = keys([flag] if action.nargs == 0 else [flag, alternatives[flag]])
        for i, (before, after) in enumerate(zip(default, values)):
            if before != after:
                changed[i].add(flag)
    assert changed == expected


def test_every_engine_option_of_the_commands_is_an_engine_option():
    """A field marked ``engine`` goes to InfluenceEngine by name: renaming an engine option must fail here, not in a run."""
    from hyperinf.app.mislabel import MislabelArgs
    from hyperinf.app.select import SelectArgs
    from hyperinf.config import option_names
    from hyperinf.paper.lds import LdsArgs
    from hyperinf.paper.logo import LogoArgs
    from hyperinf.paper.select_study import StudyArgs

    marked = {
        f.name
        for cls in (MislabelArgs, SelectArgs, StudyArgs, LdsArgs, LogoArgs)
        for f in fields(cls)
        if f.metadata.get("engine")
    }
    assert marked and marked <= set(option_names())
