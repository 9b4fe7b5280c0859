"""The models experiments train and attribute, each with what training, scoring and evaluating it need.

A :class:`Learner` works on ``(text, label)`` pairs whatever the model: a sequence classifier
(MiniLM, or a tiny random BERT for tests) is trained with cross-entropy on its head's logits and
predicts the argmax; a causal LM (SmolLM2, or a tiny random Llama for tests) sees each pair as a
prompt and an answer, is trained on the answer tokens only and predicts the answer option with
the highest log-likelihood (:mod:`hyperinf.app.causal_lm`). ``dense=True`` trains and attributes
the last transformer block (plus pooler and head for a classifier) instead of LoRA adapters.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from hyperinf.app import causal_lm
from hyperinf.app.minilm import (
    classifier_logits,
    collate_fn,
    load_minilm_lora,
    minilm_folder,
    sequence_classification_loss,
)
from hyperinf.errors import ConfigurationError

CLASSIFIERS = ("minilm", "tiny-bert")
CAUSAL_LMS = ("smollm2", "tiny-llama")
MODELS = CLASSIFIERS + CAUSAL_LMS

Pair = tuple[str, int]


@dataclass
class Learner:
    """A model and its tokenizer, the blocks to attribute, the per-example loss and the batching of pairs."""

    model: nn.Module
    tokenizer: Any
    blocks: list[str] | str
    loss: Callable[[nn.Module, Any], torch.Tensor]
    collate: Callable[[Sequence[Pair]], dict[str, torch.Tensor]]
    predict_labels: Callable[[Sequence[str], int], torch.Tensor]

    def loader(self, pairs: Sequence[Pair], batch_size: int) -> DataLoader:
        """A loader over ``pairs`` in their order (what the influence engine needs)."""
        return DataLoader(list(pairs), batch_size=batch_size, collate_fn=self.collate)

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """The predicted label index of every text."""
        return self.predict_labels(texts, batch_size)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text (without the prompt or special tokens)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def build_learner(
    model: str,
    label_names: Sequence[str],
    *,
    rank: int = 8,
    seed: int = 0,
    dense: bool = False,
    max_length: int = 128,
    template: causal_lm.PromptTemplate | None = None,
) -> Learner:
    """The learner for ``model`` (one of :data:`MODELS`) on a task with ``label_names``."""
    if model in CLASSIFIERS:
        net, tokenizer, blocks = classifier(model, len(label_names), rank=rank, seed=seed, dense=dense)

        def predict_class(texts: Sequence[str], batch_size: int) -> torch.Tensor:
            batches = DataLoader(
                [(t, 0) for t in texts], batch_size=batch_size, collate_fn=collate_fn(tokenizer, max_length)
            )
            return (
                torch.cat([classifier_logits(net, b).argmax(-1) for b in batches])
                if texts
                else torch.zeros(0, dtype=torch.long)
            )

        return Learner(
            net, tokenizer, blocks, sequence_classification_loss, collate_fn(tokenizer, max_length), predict_class
        )
    if model in CAUSAL_LMS:
        net, tokenizer, blocks = causal(model, rank=rank, seed=seed, dense=dense)
        template = template or causal_lm.default_template(label_names)

        def predict_option(texts: Sequence[str], batch_size: int) -> torch.Tensor:
            return causal_lm.predict_options(
                net, tokenizer, texts, label_names, template, max_length=max_length, batch_size=batch_size
            )

        collate = causal_lm.instruction_collate(tokenizer, label_names, template, max_length)
        return Learner(net, tokenizer, blocks, causal_lm.answer_loss, collate, predict_option)
    raise ConfigurationError(f"unknown --model / model {model!r}: use one of {', '.join(MODELS)}")


def causal(model: str, *, rank: int, seed: int, dense: bool) -> tuple[nn.Module, Any, list[str] | str]:
    """SmolLM2 (or a tiny random Llama) with LoRA on q_proj/v_proj, or with only its last block trainable."""
    if model == "smollm2":
        net, tokenizer = causal_lm.load_smollm2(seed)
    else:  # the shipped MiniLM's WordPiece tokenizer: any text, offline (a BERT one, but the tiny Llama is random anyway)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
        net = causal_lm.tiny_llama(len(tokenizer), seed=seed)
    if dense:
        for param in net.parameters():
            param.requires_grad_(False)
        return net, tokenizer, causal_lm.train_last_block(net)
    return causal_lm.add_lora(net, r=rank, seed=seed), tokenizer, "lora"


def classifier(
    model: str, num_labels: int, *, rank: int, seed: int, dense: bool
) -> tuple[nn.Module, Any, list[str] | str]:
    """A sequence classifier, its tokenizer and the blocks to attribute (LoRA, or the last layer + head)."""
    if model == "tiny-bert":
        net, tokenizer = tiny_bert(num_labels, rank=rank, seed=seed, lora=not dense)
    elif model == "minilm":
        net, tokenizer = (
            load_minilm_lora(num_labels, r=rank, seed=seed) if not dense else _minilm_dense(num_labels, seed)
        )
    else:
        raise ConfigurationError(
            f"unknown --model / model {model!r}: use one of {', '.join(CLASSIFIERS)} for a classifier"
        )
    if not dense:
        return net, tokenizer, "lora"
    tuned = last_layer_and_head(net)
    for name, param in net.named_parameters():
        param.requires_grad_(any(name.startswith(prefix + ".") for prefix in tuned))
    return net, tokenizer, tuned


def last_layer_and_head(model: nn.Module) -> list[str]:
    """Module names of a BERT classifier's last encoder layer, pooler and classification head."""
    names = [n for n, _ in model.named_modules()]
    layers = [n for n in names if re.fullmatch(r"(.*\.)?encoder\.layer\.\d+", n)]
    head = [n for n in names if n.split(".")[-1] in ("pooler", "classifier")]
    if not layers or not any(n.endswith("classifier") for n in head):
        raise ConfigurationError("--last-layer needs a BERT-style classifier (encoder.layer.N and classifier modules)")
    return [max(layers, key=lambda n: int(n.rsplit(".", 1)[1])), *head]


def _minilm_dense(num_labels: int, seed: int) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = str(minilm_folder())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def tiny_bert(num_labels: int, *, rank: int = 2, seed: int = 0, lora: bool = True) -> tuple[nn.Module, Any]:
    """A 2-layer BERT with random weights (LoRA on query/value when ``lora``) and the shipped tokenizer, for tests."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
        if lora:
            config = LoraConfig(
                r=rank, lora_alpha=16, target_modules=["query", "value"], use_rslora=True, task_type="SEQ_CLS"
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, config)
    return model.eval(), tokenizer
