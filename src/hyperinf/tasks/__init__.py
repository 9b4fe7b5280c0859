"""Reusable task helpers: models, losses and collators that experiments and benchmarks share."""

from hyperinf.tasks.causal_lm import (
    SMOLLM2_PACKAGE,
    PromptTemplate,
    add_lora,
    answer_loss,
    default_template,
    instruction_collate,
    last_block,
    load_smollm2,
    option_log_likelihoods,
    predict_options,
    tiny_llama,
    train_last_block,
)
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
    "PromptTemplate",
    "SMOLLM2_PACKAGE",
    "add_lora",
    "answer_loss",
    "collate",
    "collate_fn",
    "default_template",
    "instruction_collate",
    "last_block",
    "load_minilm_lora",
    "load_smollm2",
    "minilm_folder",
    "option_log_likelihoods",
    "predict_options",
    "sequence_classification_loss",
    "tiny_llama",
    "train_last_block",
]
