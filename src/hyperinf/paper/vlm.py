"""A LLaVA-style vision-language model from shipped parts (paper Sec. 5.3): a small ViT, a projector, SmolLM2.

No vision weights ship in any package here, so the vision backbone is a small CLIP-architecture ViT
pretrained in the project on grids of the ``pretrain`` digits (:mod:`hyperinf.paper.digit_grids`): it
learns to name the digit in each cell from that cell's patch feature, the feature the language model
later sees, and is frozen afterwards — the role CLIP plays in the paper. The model is transformers'
``LlavaForConditionalGeneration`` (users' VLMs are those classes): the ViT's 4 patch features (56 x 56
images in 28 x 28 patches, one digit each; the CLS token dropped) go through the 2-layer GELU projector
into SmolLM2-135M-Instruct (a tiny random Llama in tests) at 4 ``<image>`` placeholder tokens that open
every prompt. LoRA adapters sit on the language model's ``q_proj`` / ``v_proj``; the
projector and the adapters are what alignment and instruction tuning train.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperinf.app import causal_lm
from hyperinf.app.finetune import Schedule, train_or_load, trained_path, training_key
from hyperinf.blocks import select_blocks
from hyperinf.hf.formats import Example, collator, question_prompt
from hyperinf.hf.lm import IGNORE_INDEX
from hyperinf.hf.models import quiet_transformers
from hyperinf.paper.digit_grids import Digits, Row, draw_grids

IMAGE_TOKEN = "<image>"
PATCHES = 4  # a 56 x 56 image in 28 x 28 patches: one per cell, each a whole digit
LANGUAGE_MODELS = ("smollm2", "tiny-llama")
# The vision tower per language model: a small ViT for SmolLM2, a tinier one for the tests' tiny Llama.
VISION_SIZES = {
    "smollm2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "tiny-llama": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
}
IMAGES = {"image_size": 56, "patch_size": 28, "num_channels": 1}


def vision_config(language: str) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VISION_SIZES[language], **IMAGES)


class DigitReader(nn.Module):
    """The ViT and a head that names the digit in each cell from that cell's patch feature (the pretraining task
    of the backbone: the features the projector later maps into the language model)."""

    def __init__(self, config: Any) -> None:
        from transformers import CLIPVisionModel

        super().__init__()
        self.tower = CLIPVisionModel(config)
        self.head = nn.Linear(config.hidden_size, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 4, 10]``: logits of the digit in each cell, in reading order."""
        return self.head(self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:])  # the CLS token left out


@dataclass
class Backbone:
    """The pretrained vision tower's weights, the key they are cached under and their cell accuracy on test grids."""

    state: dict[str, torch.Tensor]
    key: str
    record: dict[str, Any]


def pretrain_backbone(
    digits: Digits,
    language: str,
    *,
    grids: int,
    epochs: int,
    seed: int,
    cache_dir: Path,
    progress: bool = True,
) -> Backbone:
    """Train (or load) the ViT on ``grids`` grids of the ``pretrain`` digits to name every cell's digit (AdamW
    1e-3, batches of 64), and measure its cell accuracy on 500 grids of the ``test`` digits."""
    rng = random.Random(f"pretrain-{seed}")
    examples = [{"digits": g} for g in draw_grids(digits, "pretrain", grids, rng)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reader = DigitReader(vision_config(language))

    def collate(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        grid = [e["digits"] for e in batch]
        return {"pixel_values": digits.grid_images(grid), "labels": digits.grid_labels(grid)}

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["pixel_values"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(-1, 4).sum(1)

    schedule = Schedule(epochs=epochs, lr=1e-3, batch_size=64, seed=seed)
    vision = VISION_SIZES[language] | IMAGES
    key = training_key({"stage": "vision", "vision": vision, "schedule": str(schedule)}, examples)
    record = train_or_load(
        reader, loss, examples, collate, schedule, trained_path(cache_dir, key), progress=progress, desc="vision"
    )
    test = draw_grids(digits, "test", 500, random.Random(f"vision-test-{seed}"))
    with torch.no_grad():
        predicted = reader(digits.grid_images(test)).argmax(-1)
    record["test_cell_accuracy"] = float((predicted == digits.grid_labels(test)).double().mean())
    state = {k.removeprefix("tower."): v for k, v in reader.state_dict().items() if k.startswith("tower.")}
    return Backbone(state, key, record)


def build_vlm(language: str, backbone: Backbone, *, rank: int, seed: int) -> tuple[nn.Module, Any]:
    """The LLaVA model (SmolLM2 or a tiny random Llama, the pretrained ViT frozen, a new projector) with LoRA on the
    language model's ``q_proj`` / ``v_proj``, and its tokenizer (with the ``<image>`` token). The projector and
    the adapters require grad; nothing else does."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    lm, tokenizer = causal_lm.load_smollm2(seed) if language == "smollm2" else _tiny_llama(seed)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = lm.config.to_dict() | {"vocab_size": len(tokenizer)}
    config = LlavaConfig(
        vision_config=vision_config(language),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    extra = len(tokenizer) - embed.shape[0]  # the image token's row: the mean embedding (never read: images replace it)
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True).expand(extra, -1)])
    model.model.language_model.load_state_dict(state)
    if lm.config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        model.lm_head.weight.data = torch.cat(
            [lm.lm_head.weight, lm.lm_head.weight.mean(0, keepdim=True).expand(extra, -1)]
        )
    model.model.vision_tower.load_state_dict(backbone.state)
    for param in model.parameters():
        param.requires_grad_(False)
    lora = LoraConfig(
        r=rank, lora_alpha=16, lora_dropout=0.0, use_rslora=True, target_modules=r".*language_model.*\.(q_proj|v_proj)"
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        model = get_peft_model(model, lora)
    for param in projector(model)[1].parameters():
        param.requires_grad_(True)
    return model, tokenizer


def _tiny_llama(seed: int) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer

    from hyperinf.app.minilm import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    return causal_lm.tiny_llama(len(tokenizer), seed=seed), tokenizer


def projector(model: nn.Module) -> tuple[str, nn.Module]:
    """The LLaVA model's ``multi_modal_projector`` (under any peft wrapper) and its module name."""
    return next((n, m) for n, m in model.named_modules() if n.endswith("multi_modal_projector"))


def projector_and_lora(model: nn.Module) -> list[str]:
    """Module names of the projector's two ``nn.Linear`` layers and every LoRA adapter: Table 5's blocks."""
    name, module = projector(model)
    linears = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return linears + [b.name for b in select_blocks(model, "lora")]


def last_language_block(model: nn.Module) -> list[str]:
    """Module names of the dense ``nn.Linear`` layers of the language model's last decoder block (LoRA's base
    layers, not its adapters): Table 8's blocks."""
    layers = next(n for n, m in model.named_modules() if n.endswith("language_model.layers"))
    last = f"{layers}.{len(dict(model.named_modules())[layers]) - 1}."
    return [
        n for n, m in model.named_modules() if n.startswith(last) and isinstance(m, nn.Linear) and ".lora_" not in n
    ]


def encode_row(tokenizer: Any, row: Row) -> Example:
    """A row as an example: ``"Image:"``, ``<image>`` x 4, the question prompt, then the answer and an EOS (a BERT
    tokenizer's SEP: the tests' tiny Llama) as the scored tokens, so that a greedy exact match stops there. The
    grid's digit indices ride along for the collate. (Text opens the sequence because a causal LM's first position
    is its attention sink, which later tokens attend to without reading it.)"""
    image = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * PATCHES
    opening = tokenizer("Image:", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("\n" + question_prompt(row["question"]), add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    answer = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"] + [end]
    return {
        "input_ids": opening + image + prompt + answer,
        "target_ids": [IGNORE_INDEX] * (len(opening) + len(image) + len(prompt)) + answer,
        "digits": list(row["digits"]),
    }


def image_collator(tokenizer: Any, digits: Digits) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """:func:`hyperinf.hf.formats.collator` plus each example's grid as ``pixel_values`` ``[B, 1, 56, 56]``."""
    texts = collator(tokenizer)

    def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return texts(examples) | {"pixel_values": digits.grid_images([e["digits"] for e in examples])}

    return collate
