"""Reading back what ``hyperinf experiment select --out RUN_DIR`` left: its settings and its cached scores."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hyperinf.app.select import Splits, scores_path
from hyperinf.errors import DataError
from hyperinf.paper.select_study import StudyArgs


def study_args(recorded: dict[str, Any]) -> StudyArgs:
    """A run's settings from the ``args`` it recorded in arguments.json."""
    paths = {
        "out": Path(recorded["out"]),
        "cache_dir": Path(recorded["cache_dir"]),
        "target": recorded["target"] and Path(recorded["target"]),
    }
    return StudyArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()} | paths)


def seeded_runs(run: Path) -> tuple[StudyArgs, list[tuple[StudyArgs, dict[str, Any]]]]:
    """The run's settings, and per seed its settings with that seed and the seed's record (warm-up key, ...)."""
    path = run / "arguments.json"
    if not path.exists():
        raise DataError(f"{run} holds no arguments.json: pass a folder written by hyperinf experiment select --out")
    recorded = json.loads(path.read_text())
    args = study_args(recorded["args"])
    return args, [(replace(args, seed=record["seed"]), record) for record in recorded["seeds"]]


def cached_scores(run: Path, seeded: StudyArgs, split: Splits, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The pool scores one seed of the run cached (:func:`hyperinf.app.select.score_pool`'s file)."""
    # the study scores per target too unless --balance; runs made before it did cached without
    paths = [
        scores_path(seeded, split, list(seeded.methods), record["warm_up"]["key"], per_target)
        for per_target in (not seeded.balance, False)
    ]
    path = next((p for p in paths if p.exists()), paths[0])
    if not path.exists():
        raise DataError(
            f"{run}: seed {record['seed']}'s scores are not in the cache ({path}): rerun the study's command to make them"
        )
    return load_file(str(path))
