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
from pathlib import Path
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
from hyperinf.hf.models import architectures, load_model, with_adapter

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
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    predict_labels: Callable[[Sequence[str], int], torch.Tensor] | None = None  # None: the rows have no labels

    def loader(self, pairs: Sequence[Any], batch_size: int) -> DataLoader:
        """A loader over ``pairs`` (or other examples ``collate`` takes) in their order (what the influence engine needs)."""
        return DataLoader(list(pairs), batch_size=batch_size, collate_fn=self.collate)

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """The predicted label index of every text."""
        if self.predict_labels is None:
            raise ConfigurationError("this learner's rows have no labels to predict: measure it on its own rows")
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
    adapter: Path | None = None,
    as_given: bool = False,
) -> Learner:
    """The learner for ``model`` (one of :data:`MODELS`, or a ``save_pretrained`` folder) on a task with
    ``label_names``; ``adapter`` (a saved peft adapter) takes the place of new LoRA adapters; ``as_given``:
    the model is not trained further, so a classifier's head must name the labels as the data does."""
    if trains_as_causal_lm(model):
        net, tokenizer, blocks = causal(model, rank=rank, seed=seed, dense=dense, adapter=adapter)
        template = template or causal_lm.default_template(label_names)

        def predict_option(texts: Sequence[str], batch_size: int) -> torch.Tensor:
            return causal_lm.predict_options(
                net, tokenizer, texts, label_names, template, max_length=max_length, batch_size=batch_size
            )

        collate = causal_lm.instruction_collate(tokenizer, label_names, template, max_length)
        return Learner(net, tokenizer, blocks, causal_lm.answer_loss, collate, predict_option)
    net, tokenizer, blocks = classifier(
        model,
        len(label_names),
        rank=rank,
        seed=seed,
        dense=dense,
        adapter=adapter,
        given_labels=label_names if as_given or adapter is not None else None,
    )

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


def trains_as_causal_lm(model: str) -> bool:
    """Whether ``model`` (a shipped name or a folder) is trained as a causal LM (classification as instruction
    data) rather than as a sequence classifier: a folder's ``config.json`` names a ``...ForCausalLM``."""
    if model in MODELS:
        return model in CAUSAL_LMS
    return any(a.endswith("ForCausalLM") for a in architectures(Path(model)))


def causal(
    model: str, *, rank: int, seed: int, dense: bool, adapter: Path | None = None
) -> tuple[nn.Module, Any, list[str] | str]:
    """SmolLM2, a tiny random Llama or a saved causal LM, with LoRA on q_proj/v_proj (peft's defaults for a
    saved model's type), with ``adapter`` on it, or with only its last block trainable."""
    if model == "smollm2":
        net, tokenizer = causal_lm.load_smollm2(seed)
    elif model == "tiny-llama":  # the shipped MiniLM's WordPiece tokenizer: any text, offline (the Llama is random)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
        net = causal_lm.tiny_llama(len(tokenizer), seed=seed)
    else:
        loaded = load_model(model)
        net, tokenizer = loaded.model, loaded.tokenizer
    if adapter is not None:
        return with_adapter(net, Path(model), adapter), tokenizer, "lora"
    if dense:
        for param in net.parameters():
            param.requires_grad_(False)
        return net, tokenizer, causal_lm.train_last_block(net)
    targets = ("q_proj", "v_proj") if model in MODELS else None
    try:
        return causal_lm.add_lora(net, r=rank, seed=seed, target_modules=targets), tokenizer, "lora"
    except ValueError as error:  # peft has no default targets for this model type
        raise ConfigurationError(
            f"cannot put LoRA adapters on the model in {model} ({str(error).splitlines()[0]}): train an adapter "
            "yourself and pass it with --adapter, or use --dense"
        ) from error


def classifier(
    model: str,
    num_labels: int,
    *,
    rank: int,
    seed: int,
    dense: bool,
    adapter: Path | None = None,
    given_labels: Sequence[str] | None = None,
) -> tuple[nn.Module, Any, list[str] | str]:
    """A sequence classifier, its tokenizer and the blocks to attribute (LoRA, or the last layer + head).

    A folder gets a new ``num_labels``-way head unless it is a classifier with that many labels, and
    peft's default LoRA targets for its model type; ``adapter`` replaces the new adapters.
    ``given_labels``: the run's label names in its order, for a model used as given (not trained
    further), whose head must name the same labels in the same order."""
    if adapter is not None and model in MODELS:
        raise ConfigurationError(
            f"--adapter needs --model to be the folder of the model it was trained on, not the shipped {model!r}"
        )
    if model == "tiny-bert":
        net, tokenizer = tiny_bert(num_labels, rank=rank, seed=seed, lora=not dense)
    elif model == "minilm":
        net, tokenizer = (
            load_minilm_lora(num_labels, r=rank, seed=seed) if not dense else _minilm_dense(num_labels, seed)
        )
    else:
        net, tokenizer = _folder_classifier(
            Path(model), num_labels, rank=rank, seed=seed, lora=not dense and adapter is None
        )
        if adapter is not None:
            net = with_adapter(net, Path(model), adapter)
        if given_labels is not None:
            check_label_order(net, given_labels, model)
    if not dense or adapter is not None:
        return net, tokenizer, "lora"
    tuned = last_layer_and_head(net)
    for name, param in net.named_parameters():
        param.requires_grad_(any(name.startswith(prefix + ".") for prefix in tuned))
    return net, tokenizer, tuned


def check_label_order(net: nn.Module, label_names: Sequence[str], folder: str) -> None:
    """Refuse a classifier whose head names its labels (``config.id2label``) otherwise than the run numbers
    them: its scores and predictions would be read under the wrong labels."""
    id2label = getattr(getattr(net, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    generic = names == [f"LABEL_{i}" for i in range(len(names))]
    if not generic and names != [str(n) for n in label_names]:
        raise ConfigurationError(
            f"the classifier in {folder} names its labels {names} (config.id2label, by id), but the data's labels "
            f"are numbered {list(map(str, label_names))}: relabel the data to the model's label names, or fix the "
            "model's id2label"
        )


def _folder_classifier(folder: Path, num_labels: int, *, rank: int, seed: int, lora: bool) -> tuple[nn.Module, Any]:
    """A saved encoder (or classifier) as a ``num_labels``-way classifier, with rsLoRA when ``lora``, and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from hyperinf.hf.models import load_tokenizer, quiet_transformers, set_pad_token_id

    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        try:
            net = AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=num_labels, ignore_mismatched_sizes=True
            )
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"cannot load {folder} as a sequence classifier: {str(error).splitlines()[0]}"
            ) from error
        if lora:
            config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, use_rslora=True, task_type="SEQ_CLS")
            try:
                net = get_peft_model(net, config)
            except ValueError as error:
                raise ConfigurationError(
                    f"peft has no default LoRA targets for the model in {folder} ({str(error).splitlines()[0]}): "
                    "train an adapter yourself and pass it with --adapter, or use --dense / --last-layer"
                ) from error
    tokenizer = load_tokenizer(folder)
    set_pad_token_id(net, tokenizer)
    return net.eval(), tokenizer


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
