"""The vision-language study's parts: digit grids and questions, the LLaVA model's per-sample gradients against
single-example autograd (padding and image patches), greedy exact match against a decoding loop, and a tiny
end-to-end ``hyperinf experiment vlm-select``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import max_relative_error, reference_gradients, reference_kronecker
from peft.tuners.lora import LoraLayer

from hyperinf.batches import ModulePadding
from hyperinf.blocks import select_blocks
from hyperinf.cli import main as cli_main
from hyperinf.errors import DataError, LossShapeError
from hyperinf.gradients import PerSampleGradients
from hyperinf.hf.lm import IGNORE_INDEX, VisionLanguageTask, completion_loss, greedy_matches
from hyperinf.paper import digit_grids as grids
from hyperinf.paper.vlm import (
    Backbone,
    build_vlm,
    encode_row,
    image_collator,
    last_language_block,
    pretrain_backbone,
    projector_and_lora,
    vision_config,
)


@pytest.fixture(scope="module")
def digits() -> grids.Digits:
    return grids.load_digits(seed=0)


def correct_answer(row: grids.Row, labels: list[int]) -> str:
    """The answer to a row's question, read again from the question's words and the grid's labels."""
    question, at = row["question"], {p: labels[i] for i, p in enumerate(grids.POSITIONS)}
    if row["family"] == "vqa":
        return str(next(d for p, d in at.items() if f"the {p}?" in question))
    if row["family"] == "gqa":
        named = sorted((question.index(f"the {p} one"), p) for p in grids.POSITIONS if f"the {p} one" in question)
        (_, first), (_, second) = named
        return first if at[first] > at[second] else second
    if row["family"] == "pope":
        return "yes" if int(question.split()[3]) in labels else "no"
    return " ".join(map(str, labels))


def test_parts_are_disjoint_and_test_rows_use_only_test_digits(digits):
    parts = {name: set(index.tolist()) for name, index in digits.parts.items()}
    assert {name: len(p) for name, p in parts.items()} == grids.PART_SIZES
    assert not parts["pretrain"] & parts["pool"] and not parts["pretrain"] & parts["test"]
    assert not parts["pool"] & parts["test"]
    for part in ("pool", "test"):
        rows = grids.instruction_rows(digits, part, 40, seed=1, name=part)
        assert all(set(r["digits"]) <= parts[part] for r in rows)
    assert grids.load_digits(seed=0).parts["test"].tolist() == digits.parts["test"].tolist()  # seeded
    assert grids.load_digits(seed=1).parts["test"].tolist() != digits.parts["test"].tolist()


def test_questions_are_answered_right_in_equal_family_shares(digits):
    rows = grids.instruction_rows(digits, "pool", 400, seed=0, name="pool")
    assert {f: sum(r["family"] == f for r in rows) for f in grids.FAMILIES} == dict.fromkeys(grids.FAMILIES, 100)
    for row in rows:
        assert row["answer"] == correct_answer(row, digits.grid_labels([row["digits"]])[0].tolist()), row
        assert not row["answer_replaced"]
    pope = [r["answer"] for r in rows if r["family"] == "pope"]
    assert 35 <= pope.count("yes") <= 65  # absent digits asked about as often as present ones
    assert [r["family"] for r in rows[:20]] != [f for _ in range(5) for f in grids.FAMILIES]  # shuffled


def test_noisy_pool_answers_exactly_its_share_wrongly(digits):
    rows = grids.instruction_rows(digits, "pool", 100, seed=0, name="pool", noise=0.2)
    replaced = [r for r in rows if r["answer_replaced"]]
    assert len(replaced) == 20
    for row in rows:
        right = correct_answer(row, digits.grid_labels([row["digits"]])[0].tolist())
        assert (row["answer"] != right) == row["answer_replaced"], row


def test_grid_image_places_the_cells_in_reading_order(digits):
    grid = digits.parts["pool"][:4].tolist()
    image = digits.grid_images([grid])[0, 0] * grids.STD + grids.MEAN
    cells = [image[:28, :28], image[:28, 28:], image[28:, :28], image[28:, 28:]]
    for cell, index in zip(cells, grid):
        torch.testing.assert_close(cell, digits.images[index])
    assert grids.caption([3, 7, 1, 0]) == "a 3, a 7, a 1 and a 0"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """The tiny LLaVA (random ViT, tiny Llama) in float64, its LoRA B drawn so every adapter has a gradient."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        from hyperinf.paper.vlm import DigitReader

        reader = DigitReader(vision_config("tiny-llama"))
    state = {k.removeprefix("tower."): v for k, v in reader.state_dict().items() if k.startswith("tower.")}
    model, tokenizer = build_vlm("tiny-llama", Backbone(state, "random", {}), rank=2, seed=0)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            weight = module.lora_B["default"].weight
            weight.data = torch.randn(weight.shape, generator=generator) * 0.5
    return model.double(), tokenizer


def double_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("which", ["projector and lora", "last block"])
def test_vlm_gradients_match_single_example_backward_calls(digits, tiny_vlm, which):
    model, tokenizer = tiny_vlm
    rows = grids.instruction_rows(digits, "pool", 8, seed=3, name="pool")
    examples = [encode_row(tokenizer, r) for r in rows]
    collate = image_collator(tokenizer, digits)
    batch = double_batch(collate(examples))
    assert (batch["attention_mask"] == 0).any()  # the families' prompts differ in length: padding is tested
    names = projector_and_lora(model) if which == "projector and lora" else last_language_block(model)
    blocks = select_blocks(model, names)
    task = VisionLanguageTask()
    computed = PerSampleGradients(
        model, task.loss, blocks, dtype=torch.float64, kronecker=True, padding=task.padding_mask
    )(batch)
    singles = [double_batch(collate([e])) for e in examples]
    expected = reference_gradients(model, task.loss, singles, blocks)
    reference = reference_kronecker(model, task.loss, singles, blocks)
    for block in blocks:
        assert max_relative_error(computed.grads[block.name], expected[block.name]) < 1e-10, block.name
        factors = computed.factors[block.name]
        assert factors.tokens == int(reference[block.name]["tokens"]), block.name  # padding left out of the token sums
        torch.testing.assert_close(factors.inputs, reference[block.name]["inputs"], rtol=1e-10, atol=1e-12)
    patches = sum(b.name.endswith("linear_1") for b in blocks) * len(examples) * 4
    assert not patches or computed.factors[names[0]].tokens == patches  # the projector's tokens: every image patch


def test_a_projector_block_needs_the_image_padding(digits, tiny_vlm):
    """With the text sequence's mask alone, the projector's input (image patches) cannot be masked: refused."""
    model, tokenizer = tiny_vlm
    batch = double_batch(
        image_collator(tokenizer, digits)(
            [encode_row(tokenizer, r) for r in grids.instruction_rows(digits, "pool", 2, 0, name="p")]
        )
    )
    blocks = select_blocks(model, projector_and_lora(model)[:1])
    with pytest.raises(LossShapeError, match="multi_modal_projector.linear_1.*ModulePadding"):
        PerSampleGradients(model, completion_loss, blocks, dtype=torch.float64)(batch)


def test_greedy_matches_equal_a_decoding_loop(tiny_vlm, digits):
    """Rows whose scored tokens are the model's own greedy continuation match; the same rows with a last token
    changed do not."""
    model, tokenizer = tiny_vlm
    rows = grids.instruction_rows(digits, "pool", 4, seed=5, name="pool")
    collate = image_collator(tokenizer, digits)
    examples = []
    for row in rows:
        prompt = encode_row(tokenizer, row)
        ids = [t for t, target in zip(prompt["input_ids"], prompt["target_ids"]) if target == IGNORE_INDEX]
        for _ in range(3):  # greedy decoding, one full forward per token
            batch = double_batch(collate([{"input_ids": ids, "target_ids": ids, "digits": row["digits"]}]))
            with torch.no_grad():
                logits = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                ).logits
            ids = ids + [int(logits[0, -1].argmax())]
        decoded = {"input_ids": ids, "target_ids": [IGNORE_INDEX] * (len(ids) - 3) + ids[-3:], "digits": row["digits"]}
        changed = dict(
            decoded,
            input_ids=ids[:-1] + [(ids[-1] + 1) % 50],
            target_ids=decoded["target_ids"][:-1] + [(ids[-1] + 1) % 50],
        )
        examples += [decoded, changed]
    batches = [double_batch(collate(examples[i : i + 3])) for i in range(0, len(examples), 3)]
    assert greedy_matches(model, batches).tolist() == [True, False] * len(rows)


def test_backbone_pretraining_is_cached_under_its_settings(digits, tmp_path):
    def backbone(**changes):
        settings = {"grids": 32, "epochs": 1, "seed": 0} | changes
        return pretrain_backbone(digits, "tiny-llama", cache_dir=tmp_path, progress=False, **settings)

    first, again = backbone(), backbone()
    assert not first.record["cached"] and again.record["cached"] and first.key == again.key
    for name, tensor in first.state.items():
        torch.testing.assert_close(again.state[name], tensor)
    assert len({first.key, backbone(grids=48).key, backbone(epochs=2).key, backbone(seed=1).key}) == 4


def test_module_padding_matches_whole_dotted_parts():
    text, image = torch.ones(2, 5), torch.ones(2, 4)
    padding = ModulePadding(text, {"multi_modal_projector": None, "model.vision_tower": image})
    assert padding.for_block("base_model.model.model.multi_modal_projector.linear_1") is None
    assert padding.for_block("model.vision_tower.encoder.fc") is image
    assert padding.for_block("vision_tower.encoder.fc") is text  # "model.vision_tower" needs both parts
    assert padding.for_block("model.my_multi_modal_projector.fc") is text  # a part, not a substring


@pytest.mark.parametrize("setting", ["after-alignment", "before-alignment"])
def test_vlm_select_runs_end_to_end(tmp_path, setting):
    out = tmp_path / "run"
    argv = [
        "experiment", "vlm-select", "--model", "tiny-llama", "--setting", setting, "--variant", "noisy",
        "--n-pool", "20", "--n-target", "4",
        "--n-test", "2", "--n-align", "8", "--vision-grids", "16", "--vision-epochs", "1", "--batch-size", "8",
        "--random-draws", "1", "--fraction", "0.25,0.5", "--methods", "hyperinf,tracin",
        "--cache-dir", str(tmp_path / "cache" / "adapters"), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    import pandas as pd

    results = pd.read_csv(out / "results.csv")
    selectors = set(results["selector"])
    assert {
        "hyperinf",
        "tracin",
        "less",
        "RDS+",
        "random",
        "full pool",
        "warm-up only",
        "hyperinf per-target",
    } <= selectors
    assert {f"accuracy_{f}" for f in grids.FAMILIES} <= set(results.columns)
    full = results[results["selector"] == "full pool"].iloc[0]
    assert full["flipped_kept"] == pytest.approx(0.2) and full["size"] == 20
    record = json.loads((out / "arguments.json").read_text())
    assert record["args"]["setting"] == setting and "vision" in record["seeds"][0]
    assert (out / "selection.png").stat().st_size > 0
    if setting == "after-alignment":
        assert Path(record["seeds"][0]["warm_up"]["path"]).exists()  # the aligned model is cached
    else:  # scored on the last language-model block of the unaligned model
        assert record["args"]["methods"] == ["hyperinf", "tracin"] and record["args"]["dense"]
        assert "path" not in record["seeds"][0]["warm_up"]


def test_settings_choose_blocks_methods_and_keys():
    from hyperinf.paper.vlm_select import VlmStudyArgs

    after, before = VlmStudyArgs(), VlmStudyArgs(setting="before-alignment")
    assert after.methods == ("hyperinf", "datainf", "lissa", "tracin") and not after.dense
    assert before.methods == after.methods + ("ekfac",) and before.dense and before.damping_mode == "gfim"
    with pytest.raises(DataError, match="--vision-epochs 0"):
        VlmStudyArgs(vision_epochs=0)
