"""Reusable task helpers: models, losses and collators that experiments and benchmarks share."""

from hyperinf.tasks.minilm import (
    MINILM_PACKAGE,
    collate,
    collate_fn,
    load_minilm_lora,
    minilm_folder,
    sequence_classification_loss,
)

__all__ = [
    "MINILM_PACKAGE",
    "collate",
    "collate_fn",
    "load_minilm_lora",
    "minilm_folder",
    "sequence_classification_loss",
]
