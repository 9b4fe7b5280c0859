"""Answering multiple-choice rows with a causal LM, as lm-eval-harness does.

Every option is scored as the completion of the row's question prompt
(:func:`hyperinf.hf.formats.encode_choices`, :func:`hyperinf.hf.lm.choice_log_likelihoods`); the
model's answer is the option with the highest summed log-likelihood (``acc``) or with the highest
log-likelihood per character of the option (``acc_norm``, which does not favour short options).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hyperinf.errors import DataError
from hyperinf.hf.formats import collator, encode_choices
from hyperinf.hf.lm import choice_log_likelihoods


@dataclass
class ChoiceAnswers:
    """Per row, the option the model picks: by log-likelihood and by log-likelihood per character."""

    answer: torch.Tensor  # [N] long
    answer_norm: torch.Tensor  # [N] long

    def accuracy(self, keys: Sequence[int]) -> dict[str, float]:
        """``acc`` and ``acc_norm`` against the answer keys (the index of each row's correct option)."""
        truth = torch.tensor(list(keys), dtype=torch.long)
        if truth.shape != self.answer.shape:
            raise DataError(f"{truth.numel()} answer keys for {self.answer.numel()} answered rows")
        return {
            "accuracy": float((self.answer == truth).double().mean()),
            "accuracy_norm": float((self.answer_norm == truth).double().mean()),
        }


@torch.no_grad()
def answer_choices(
    model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], batch_size: int = 16
) -> ChoiceAnswers:
    """The model's answer to each row (``question``, ``choices``): every (row, option) sequence scored whole,
    batched in order of length (less padding); the rows' answers in the given order.

    (Running each prompt once and its options from its key-value cache runs fewer tokens, but was slower
    on SmolLM2 on a CPU when tried: the batched whole sequences keep the matrix products large.)
    """
    if not rows:
        raise DataError("no multiple-choice rows to answer")
    examples, counts, chars = [], [], []
    for row in rows:
        options = encode_choices(tokenizer, row)
        examples += options
        counts.append(len(options))
        chars += [len(" " + str(choice)) for choice in row["choices"]]  # the scored text: the option after a space
    order = sorted(range(len(examples)), key=lambda j: len(examples[j]["input_ids"]))
    collate = collator(tokenizer)
    batches = [collate([examples[j] for j in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]
    in_order = choice_log_likelihoods(model, batches).double().cpu()
    scores = torch.empty_like(in_order)
    scores[torch.tensor(order)] = in_order
    per_char = scores / torch.tensor(chars, dtype=torch.double)
    return ChoiceAnswers(
        torch.tensor([int(row.argmax()) for row in scores.split(counts)]),
        torch.tensor([int(row.argmax()) for row in per_char.split(counts)]),
    )
