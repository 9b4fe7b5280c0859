"""A user's Hugging Face model as saved: a ``save_pretrained`` folder, optionally a peft adapter folder on it.

The folder's ``config.json`` decides how it loads: an ``...ForCausalLM`` architecture with
``AutoModelForCausalLM``, an ``...ForSequenceClassification`` one with
``AutoModelForSequenceClassification``. A saved peft adapter is put on it trainable (peft loads
adapters frozen otherwise, and their gradients are what is attributed). Nothing is downloaded.
Every problem is a one-line :class:`~hyperinf.errors.DataError` or
:class:`~hyperinf.errors.ConfigurationError` naming the folder and the fix.

    loaded = load_model("my-model", adapter="my-adapter")
    engine = InfluenceEngine(loaded.model, CausalLMTask(), blocks=default_blocks(loaded.model))
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyperinf.blocks import BlockSpec
from hyperinf.errors import ConfigurationError, DataError
from hyperinf.hf.formats import ModelKind

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
KIND_OF_ARCHITECTURE = {"ForCausalLM": "causal-lm", "ForSequenceClassification": "classifier"}


@dataclass
class LoadedModel:
    """A loaded model in eval mode, its tokenizer (right padding, a pad token), its kind and where it came from."""

    model: nn.Module
    tokenizer: Any
    kind: ModelKind
    folder: Path
    adapter: Path | None = None

    @property
    def label2id(self) -> dict[str, int]:
        """A classifier's label names -> ids (``config.label2id``); empty for a causal LM."""
        if self.kind != "classifier":
            return {}
        config: Any = self.model.config
        return {str(name): int(i) for name, i in config.label2id.items()}


def architectures(folder: Path) -> list[str]:
    """The architectures a saved model's ``config.json`` names, after checking the folder is a saved model."""
    check_model_folder(folder)
    return [str(a) for a in json.loads((folder / "config.json").read_text()).get("architectures") or []]


def model_kind(folder: str | Path) -> ModelKind:
    """``"causal-lm"`` or ``"classifier"``, from the architectures a saved model's ``config.json`` names."""
    folder = Path(folder)
    named = architectures(folder)
    for architecture in named:
        for suffix, kind in KIND_OF_ARCHITECTURE.items():
            if architecture.endswith(suffix):
                return kind  # type: ignore[return-value]
    raise DataError(
        f"{folder} holds a {', '.join(named) or 'model of no named architecture'} (config.json's "
        "architectures): hyperinf loads a causal LM (...ForCausalLM) or a sequence classifier "
        "(...ForSequenceClassification); load another model in Python and pass it to InfluenceEngine"
    )


def check_model_folder(folder: Path) -> None:
    """Refuse a path that is not a saved model: missing, a file, an adapter folder, no config or no weights."""
    if not folder.exists():
        raise DataError(f"--model {folder} does not exist: pass a folder written by save_pretrained, or a shipped name")
    if not folder.is_dir():
        raise DataError(f"--model {folder} is a file: pass the folder save_pretrained wrote (config.json and weights)")
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise DataError(
                f"{folder} is a peft adapter, not a model: pass its base model as --model and {folder} as --adapter"
            )
        raise DataError(
            f"{folder} has no config.json: --model takes a folder written by save_pretrained (config.json and weights)"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise DataError(
            f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): save the model with "
            "save_pretrained, which writes both"
        )


def check_adapter_folder(adapter: Path) -> None:
    """Refuse an adapter path without the ``adapter_config.json`` peft's ``save_pretrained`` writes."""
    if not (adapter / "adapter_config.json").is_file():
        raise DataError(
            f"--adapter {adapter} holds no adapter_config.json: pass the folder a peft model's save_pretrained wrote"
        )


def load_model(
    folder: str | Path, *, adapter: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """The model saved in ``folder`` (with the peft adapter saved in ``adapter`` on it) in ``dtype``, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded (read when transformers is first imported)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(folder)
    kind = model_kind(folder)
    adapter_folder = Path(adapter) if adapter is not None else None
    if adapter_folder is not None:
        check_adapter_folder(adapter_folder)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    model: Any
    with quiet_transformers():
        try:
            model = auto.from_pretrained(str(folder), dtype=dtype)
        except (OSError, ValueError, RuntimeError) as error:
            raise DataError(f"cannot load the model in {folder}: {_first_line(error)}") from error
        tokenizer = load_tokenizer(folder, adapter_folder)
        if adapter_folder is not None:
            model = with_adapter(model, folder, adapter_folder)
    set_pad_token_id(model, tokenizer)
    return LoadedModel(model.to(dtype).eval(), tokenizer, kind, folder, adapter_folder)


def set_pad_token_id(model: nn.Module, tokenizer: Any) -> None:
    """Give the model's config the tokenizer's pad id when it has none: a decoder used as a sequence
    classifier finds each row's last token by it, and refuses batches of more than one without it."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(folder: Path, adapter: Path | None = None) -> Any:
    """The tokenizer saved with the adapter, else with the model; right-padded, with a pad token."""
    from transformers import AutoTokenizer

    for source in (adapter, folder):  # a fine-tuning run saves the tokenizer it changed beside its adapter
        if source is None:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError, TypeError):
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        return tokenizer
    raise DataError(
        f"no tokenizer in {folder}{f' or {adapter}' if adapter else ''}: save it beside the model "
        "(tokenizer.save_pretrained(folder))"
    )


def with_adapter(model: nn.Module, folder: Path, adapter: Path) -> nn.Module:
    """``model`` (loaded from ``folder``) with the peft adapter saved in ``adapter`` on it, trainable."""
    from peft import PeftModel

    check_adapter_folder(adapter)
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as error:
        raise DataError(
            f"the adapter in {adapter} does not fit the model in {folder} (it was saved for {recorded or 'a base model it does not name'}): "
            f"{_first_line(error)}; pass the base model it was trained on"
        ) from error


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading messages and bars, and peft's use of a deprecated transformers API."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA adapters (``lora_A`` modules)."""
    return any(name.split(".")[-1] == "lora_A" for name, _ in model.named_modules())


def default_blocks(model: nn.Module) -> BlockSpec:
    """``"lora"`` for a model with adapters; otherwise a :class:`ConfigurationError` that names blocks to pass."""
    if has_adapters(model):
        return "lora"
    try:
        block = last_block(model)
        suggestion = ",".join(
            n for n, m in model.named_modules() if n.startswith(block + ".") and isinstance(m, nn.Linear)
        )
        example = f"e.g. --blocks {suggestion} (the last block's linear layers), "
    except ConfigurationError:
        example = ""
    raise ConfigurationError(
        f"the model has no peft adapters, so the blocks to attribute must be named: pass --adapter DIR, or {example}"
        "--blocks linear (every nn.Linear) or module names (blocks=... in Python)"
    )


def parse_blocks(text: str) -> BlockSpec:
    """``lora``, ``linear`` or comma-separated module names, as a block specification."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigurationError("--blocks is empty: pass lora, linear or module names")
    return names[0] if names in (["lora"], ["linear"]) else names


def last_block(model: nn.Module) -> str:
    """Module name of the last transformer block (``"model.layers.29"`` for SmolLM2).

    Found as the last entry of the module list with ``model.config.num_hidden_layers`` entries (so
    a peft wrapper's prefix is included), not from a hard-coded path.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigurationError(
            f"{type(model).__name__} has no config.num_hidden_layers: last_block needs a transformers model "
            "(or name the influence blocks yourself)"
        )
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and name]
    if len(lists) > 1:
        lists = [name for name in lists if name.split(".")[-1] in ("layers", "layer", "h", "blocks")] or lists
    if len(lists) != 1:
        found = "none" if not lists else ", ".join(lists)
        raise ConfigurationError(
            f"cannot tell the blocks of {type(model).__name__}: module lists of {n} "
            f"(config.num_hidden_layers) entries: {found}; name the influence blocks yourself"
        )
    return f"{lists[0]}.{n - 1}"
