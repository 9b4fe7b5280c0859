"""Per-example losses of Hugging Face models on the batches :mod:`hyperinf.hf.formats` builds.

A causal LM's loss is the negative log-likelihood of an example's scored tokens (those whose
``target_ids`` entry is not ``-100``: the completion, the assistant turns, every token of plain
text), averaged over them by default (``reduction="sum"`` for the summed convention); a sequence
classifier's is the cross-entropy of its label. :class:`CausalLMTask` and
:class:`ClassificationTask` are these losses as :class:`hyperinf.Task` objects (:class:`VisionLanguageTask`
for a LLaVA-style model, whose batches carry images), what
:class:`hyperinf.InfluenceEngine` differentiates. :func:`choice_log_likelihoods` scores every
option of multiple-choice questions (lm-eval-harness' way).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from hyperinf.batches import ModulePadding, padding_mask
from hyperinf.errors import ConfigurationError
from hyperinf.task import Task

IGNORE_INDEX = -100  # target id of unscored positions: prompt, user turns, padding (PyTorch's cross-entropy default)
Reduction = Literal["mean", "sum"]


def completion_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], reduction: Reduction = "mean") -> torch.Tensor:
    """Per-example negative log-likelihood of the scored tokens, ``[B]``: their mean, or their sum.

    The logits at position ``t`` predict token ``t + 1``; only ``input_ids``, ``attention_mask`` (and
    a vision-language model's ``pixel_values``) go to the model, and logits are formed at the scoring positions alone
    (:func:`logits_at`). A row without a scored token has loss 0 under ``"sum"`` and is refused
    under ``"mean"``, where it has no mean.
    """
    targets = batch["target_ids"]
    keep = target_predicting(targets)
    logits = logits_at(model, batch, keep)
    rows, cols = torch.nonzero(keep.to(logits.device), as_tuple=True)
    nll = F.cross_entropy(logits, targets.to(logits.device)[rows, cols + 1], reduction="none")
    total = torch.zeros(targets.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    if reduction == "sum":
        return total
    counts = keep.sum(dim=1).to(total.device)
    if bool((counts == 0).any()):
        raise ConfigurationError(
            f"batch rows {torch.nonzero(counts == 0).squeeze(1).tolist()} have no scored token (every target_ids "
            "entry is -100): a mean loss needs at least one; drop those rows or use reduction='sum'"
        )
    return total / counts


def target_predicting(target_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose next token is scored (position ``t`` predicts ``t + 1``)."""
    keep = torch.zeros_like(target_ids, dtype=torch.bool)
    keep[:, :-1] = target_ids[:, 1:] != IGNORE_INDEX
    return keep


def logits_at(model: nn.Module, batch: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """``[keep.sum(), V]``: the logits at the ``True`` positions of ``keep`` ``[B, T]``, in row-major order.

    Models whose modeling code slices by a position mask before the LM head (``logits_to_keep``,
    as Llama's does in recent transformers) project only those positions onto the vocabulary: on
    SmolLM2 the head is a fifth of a forward pass. Any other model computes every position's logits
    and they are selected afterwards: the same numbers.
    """
    inputs = model_inputs(batch)
    if _slices_logits_by_mask(model):
        return model(**inputs, logits_to_keep=keep.to(batch["input_ids"].device)).logits
    logits = model(**inputs).logits
    return logits[keep.to(logits.device)]


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a batch gives the model: ``input_ids``, ``attention_mask`` and, for a vision-language model,
    ``pixel_values`` (targets and labels stay out: the model would average them into one loss)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}


def _slices_logits_by_mask(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a peft wrapper holds) comes from modeling code that uses
    transformers' ``slice_logits_to_keep``, the helper that takes a ``[B, T]`` boolean mask."""
    unwrap = getattr(model, "get_base_model", None)
    base = unwrap() if callable(unwrap) else model
    module = sys.modules.get(type(base).__module__)
    return getattr(module, "slice_logits_to_keep", None) is not None


def classification_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy ``[B]`` of a sequence classifier; the labels are not passed to the model
    (it would average them)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    logits = model(**inputs).logits
    return F.cross_entropy(logits, batch["labels"].to(batch["input_ids"].device), reduction="none")


class CausalLMTask(Task):
    """:func:`completion_loss` as a task: the same loss trains and measures."""

    def __init__(self, reduction: Reduction = "mean") -> None:
        if reduction not in get_args(Reduction):
            raise ConfigurationError(f"loss reduction must be one of {get_args(Reduction)}, got {reduction!r}")
        self.reduction: Reduction = reduction

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return completion_loss(model, batch, self.reduction)


class VisionLanguageTask(CausalLMTask):
    """:func:`completion_loss` of a vision-language model (transformers' ``LlavaForConditionalGeneration``):
    batches carry ``pixel_values`` beside the token ids, and the layers of ``image_modules`` (the vision tower and the
    projector) run on image patches, which have no padding, while the language model's run on the text
    sequence, padded as ``attention_mask`` says."""

    def __init__(
        self, reduction: Reduction = "mean", image_modules: Sequence[str] = ("vision_tower", "multi_modal_projector")
    ) -> None:
        super().__init__(reduction)
        self.image_modules = tuple(image_modules)

    def padding_mask(self, batch: Any) -> ModulePadding:
        return ModulePadding(padding_mask(batch), dict.fromkeys(self.image_modules))


class ClassificationTask(Task):
    """:func:`classification_loss` as a task."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return classification_loss(model, batch)


@torch.no_grad()
def choice_log_likelihoods(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``[N]``: the summed log-likelihood of each row's scored tokens, over ``batches`` in order.

    With one row per (question, option) pair whose scored tokens are the option
    (:func:`hyperinf.hf.formats.encode_choices`), the option with the highest value is the model's
    answer (lm-eval-harness' ``acc``; divide by the option's length in characters for ``acc_norm``).
    """
    device = next(model.parameters()).device
    parts = [-completion_loss(model, {k: v.to(device) for k, v in b.items()}, "sum") for b in batches]
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


@torch.no_grad()
def greedy_matches(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``[N]`` bool: whether greedy decoding reproduces each row's scored tokens, over ``batches`` in order.

    Greedy decoding from the prompt writes exactly the scored tokens when each of them is the most likely
    next token given the tokens before it, so one teacher-forced forward pass decides an exact-match answer
    (end the scored tokens with an EOS for the match to include stopping there).
    """
    device = next(model.parameters()).device
    parts = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = batch["target_ids"]
        keep = target_predicting(targets)
        rows, cols = torch.nonzero(keep, as_tuple=True)
        wrong = logits_at(model, batch, keep).argmax(-1) != targets[rows, cols + 1]
        misses = torch.zeros(targets.shape[0], dtype=torch.long, device=device).index_add(0, rows, wrong.long())
        parts.append((misses == 0) & keep.any(dim=1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=device)


@torch.no_grad()
def mean_hidden_states(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``[N, H]``: each row's final hidden states averaged over its tokens (padding left out), over ``batches``
    in order: the representation RDS+ compares (:func:`hyperinf.selection.representation_scores`)."""
    device = next(model.parameters()).device
    parts = []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        mask = inputs["attention_mask"]
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        parts.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(parts) if parts else torch.zeros(0, device=device)
