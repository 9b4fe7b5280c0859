"""Writing results to disk atomically: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if nothing is left in it (a run's checkpoint folder once every pass finished)."""
    try:
        folder.rmdir()
    except OSError:  # absent, or still holding files
        pass


# Characters a JSON string may hold raw that line splitters other than "\n" (Python's str.splitlines) break on.
_LINE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(record: Any) -> str:
    """One JSON-lines record, newline included: non-ASCII text kept readable, the three line separators
    JSON leaves raw (U+0085, U+2028, U+2029) escaped, so any line reader reads one record per line."""
    text = json.dumps(record, ensure_ascii=False, default=str)
    for raw, escaped in _LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    return text + "\n"


def write_jsonl(path: Path, records: Iterable[Any]) -> None:
    """A JSON-lines file of ``records`` (:func:`json_line`), written atomically."""
    text = "".join(map(json_line, records))
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def save_results(
    directory: str | Path,
    results: Mapping[str, torch.Tensor],
    arguments: Mapping[str, Any],
    diagnostics: list[dict[str, Any]],
) -> Path:
    """Write ``scores.safetensors``, ``arguments.json`` and ``diagnostics.json`` into ``directory``."""
    directory = Path(directory)
    if not results:
        raise ValueError("nothing to save: compute scores (score / self_influence / pairwise) first.")
    # Own copies: safetensors refuses entries that share storage (a result stored under two names).
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in results.items()}
    atomic_write(directory / "scores.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(directory / "arguments.json", dict(arguments))
    write_json(directory / "diagnostics.json", diagnostics)
    return directory


def load_scores(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors written by :func:`save_results`."""
    return load_file(str(Path(directory) / "scores.safetensors"))
