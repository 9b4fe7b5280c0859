"""A user's data file as a table whose row ``i`` is the file's ``i``-th record (0-based), nothing dropped.

JSON lines, JSON (a list of objects, or JSON lines under a ``.json`` name), CSV, TSV, parquet, a
folder written by ``datasets``' ``save_to_disk`` (of a ``DatasetDict``, its ``train`` split), a
pandas ``DataFrame`` or a ``datasets.Dataset``. List-valued columns (chat ``messages``,
multiple-choice ``choices``) come back as Python lists; in CSV / TSV a cell holding a JSON list is
read as one. Errors are :class:`~hyperinf.errors.DataError`, naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hyperinf.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_table(source: str | Path | Any) -> Any:
    """The ``pandas.DataFrame`` of ``source``, index ``0..n-1`` = row positions in the file."""
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        frame = source
    elif hasattr(source, "to_pandas"):
        frame = source.to_pandas()
    elif isinstance(source, (str, Path)):
        path = Path(source)
        frame = _read_folder(path).to_pandas() if path.is_dir() else _read_file(path)
    else:
        raise DataError(
            f"cannot read data from a {type(source).__name__}: pass a path, a DataFrame or a datasets.Dataset"
        )
    return frame.reset_index(drop=True)


def _read_file(path: Path) -> Any:
    import pandas as pd

    if path.suffix not in SUFFIXES:
        raise DataError(
            f"unsupported data file {path.name}: use {', '.join(SUFFIXES)} or a datasets folder (save_to_disk)"
        )
    if not path.exists():
        raise DataError(f"data file {path} does not exist: check the path")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty: it needs rows (and, for .csv / .tsv, a header row)")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix in (".jsonl", ".json"):
            return pd.DataFrame.from_records(_json_records(path))
        # Only an empty cell is missing: "None", "NA" or "null" are a user's text, label or answer.
        frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", keep_default_na=False, na_values=[""])
        return _lists_from_json_cells(frame)
    except (ValueError, UnicodeDecodeError) as error:  # pandas', pyarrow's and json's parse errors
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read {path} as a {path.suffix[1:]} file ({message}): check its format") from error


def _json_records(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON array file or of a JSON-lines file (one object per non-blank line)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        # Only "\n" ends a JSON line: str.splitlines would also split inside a string at U+2028 and kin.
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"line {number} is not a JSON object: {error.msg}") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"record {bad} is a {type(records[bad]).__name__}, not an object of named fields")
    return records


def _lists_from_json_cells(frame: Any) -> Any:
    """Columns of a CSV / TSV whose every filled cell is a JSON list, as lists."""
    import pandas as pd

    for column in frame.columns:
        cells = frame[column].dropna()
        if len(cells) and pd.api.types.is_string_dtype(frame[column]) and cells.map(_is_json_list).all():
            frame[column] = frame[column].astype(object).map(lambda c: json.loads(c) if isinstance(c, str) else None)
    return frame


def _is_json_list(cell: Any) -> bool:
    if not isinstance(cell, str) or not cell.lstrip().startswith("["):
        return False
    try:
        return isinstance(json.loads(cell), list)
    except json.JSONDecodeError:
        return False


def _read_folder(path: Path) -> Any:
    """The ``Dataset`` saved in ``path``; of a saved ``DatasetDict``, its ``train`` split."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk: {error}") from error
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(
                f"the saved DatasetDict in {path} has no 'train' split (splits: {', '.join(data)}); save the split to use"
            )
        data = data["train"]
    return data
