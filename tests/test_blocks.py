"""Block selection and layout, and the errors raised by block selection and per-sample gradients."""

from __future__ import annotations

import re

import pytest
import torch
from models import (
    mlp,
    mlp_batch,
    mlp_loss,
    random_padded_batch,
    tiny_bert,
    tiny_bert_lora,
)
from torch import nn

from hyperinf.blocks import Block, select_blocks
from hyperinf.errors import (
    BlockSelectionError,
    HyperinfError,
    LossShapeError,
    NonFiniteGradientError,
)
from hyperinf.gradients import PerSampleGradients

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

R = 4


@pytest.fixture(scope="module")
def bert_lora() -> nn.Module:
    # intermediate.dense is Linear(32 -> 64), so lora_A (r x d_in) and lora_B (r x d_out) differ
    return tiny_bert_lora(r=R, target_modules=("query", "value", "intermediate.dense"))


@pytest.fixture(scope="module")
def bert_plain() -> nn.Module:
    return tiny_bert()


def _mlp_lora(r: int = 3) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(mlp(), LoraConfig(r=r, lora_alpha=r, target_modules=["fc1", "fc2"], lora_dropout=0.0))


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def test_lora_selection_count_and_shapes(bert_lora):
    blocks = select_blocks(bert_lora, "lora")
    assert len(blocks) == 2 * 3 * 2  # layers x targets x {A, B}
    assert all(isinstance(b, Block) and isinstance(b.module, nn.Linear) for b in blocks)
    names = [b.name for b in blocks]
    assert len(set(names)) == len(names)
    assert sum(".lora_A." in n for n in names) == sum(".lora_B." in n for n in names) == 6
    for b in blocks:
        d_in_base = 64 if ".output.dense" in b.name else 32
        if ".lora_A." in b.name:
            assert b.side == "in"
            assert b.shape == (R, b.module.in_features) == (R, d_in_base)
        else:
            assert b.side == "out"
            d_out_base = 64 if "intermediate.dense" in b.name else 32
            assert b.shape == (R, b.module.out_features) == (R, d_out_base)
        assert b.num_params == b.module.weight.numel()  # LoRA adapters have no bias
        assert b.parameters() == [b.module.weight]


def test_lora_selection_ignores_dense_side(bert_lora):
    for side in ("in", "out"):
        for b in select_blocks(bert_lora, "lora", side=side):
            assert b.shape[0] == R, (side, b.name, b.shape)


def test_lora_selection_on_custom_peft_model():
    model = _mlp_lora(r=3)  # fc1: 6 -> 8, fc2: 8 -> 10
    shapes = {b.name.split(".")[-3] + "." + b.name.split(".")[-2]: b.shape for b in select_blocks(model, "lora")}
    assert shapes == {"fc1.lora_A": (3, 6), "fc1.lora_B": (3, 8), "fc2.lora_A": (3, 8), "fc2.lora_B": (3, 10)}


def test_linear_selection_and_bias_column():
    model = mlp()  # fc1 6->8, fc2 8->10, out 10->3
    blocks = select_blocks(model, "linear")
    assert [b.name for b in blocks] == ["fc1", "fc2", "out"]
    assert [b.shape for b in blocks] == [(8, 7), (10, 9), (3, 11)]
    assert [b.num_params for b in blocks] == [8 * 7, 10 * 9, 3 * 11]
    assert all(b.parameters() == [b.module.weight, b.module.bias] for b in blocks)
    out_side = select_blocks(model, "linear", side="out")
    assert [b.shape for b in out_side] == [(7, 8), (9, 10), (11, 3)]
    no_bias = select_blocks(model, "linear", include_bias=False)
    assert [b.shape for b in no_bias] == [(8, 6), (10, 8), (3, 10)]
    assert all(b.parameters() == [b.module.weight] for b in no_bias)


def test_include_bias_on_layer_without_bias_adds_no_column():
    model = mlp(bias=False)
    blocks = select_blocks(model, "linear", include_bias=True)
    assert [b.shape for b in blocks] == [(8, 6), (10, 8), (3, 10)]
    assert not any(b.has_bias for b in blocks)


def test_linear_selection_counts_every_linear(bert_plain):
    blocks = select_blocks(bert_plain, "linear")
    # per layer: query, key, value, attention.output.dense, intermediate.dense, output.dense; + pooler + classifier
    assert len(blocks) == 2 * 6 + 2
    assert blocks[-1].name == "classifier" and blocks[-1].shape == (2, 33)


def test_selection_by_names_and_container(bert_plain):
    blocks = select_blocks(bert_plain, ["classifier", "bert.encoder.layer.1"])
    names = [b.name for b in blocks]
    assert names[0] == "classifier"
    assert sorted(names[1:]) == sorted(
        f"bert.encoder.layer.1.{s}"
        for s in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    )
    shapes = dict(zip(names, (b.shape for b in blocks)))
    assert shapes["bert.encoder.layer.1.intermediate.dense"] == (64, 33)
    assert shapes["bert.encoder.layer.1.output.dense"] == (32, 65)


def test_selection_by_names_deduplicates(bert_plain):
    layer = "bert.encoder.layer.1"
    blocks = select_blocks(bert_plain, [layer, layer + ".output.dense", "classifier", "classifier"])
    names = [b.name for b in blocks]
    assert len(names) == len(set(names)) == 7


def test_layout_values():
    lin = nn.Linear(3, 2)
    w = torch.arange(6.0).reshape(2, 3)
    bias = torch.tensor([10.0, 20.0])
    block_in = Block("lin", lin, "in", True)
    torch.testing.assert_close(block_in.layout(w, bias), torch.tensor([[0.0, 1, 2, 10], [3, 4, 5, 20]]))
    block_out = Block("lin", lin, "out", True)
    torch.testing.assert_close(block_out.layout(w, bias), torch.tensor([[0.0, 1, 2, 10], [3, 4, 5, 20]]).T)
    # batched: [B, d_out, d_in] -> [B, r, d]
    wb = torch.stack([w, -w])
    bb = torch.stack([bias, -bias])
    assert block_out.layout(wb, bb).shape == (2, 4, 2)
    torch.testing.assert_close(block_out.layout(wb, bb)[1], -block_out.layout(w, bias))
    assert Block("lin", lin, "in", False).layout(w).shape == (2, 3)
    with pytest.raises(ValueError, match="bias"):
        block_in.layout(w)


def test_lora_b_layout_is_transpose(bert_lora):
    block = next(b for b in select_blocks(bert_lora, "lora") if "intermediate.dense.lora_B" in b.name)
    w = torch.randn(64, R)  # lora_B weight is d_out x r
    torch.testing.assert_close(block.layout(w), w.T)


# ----------------------------------------------------------------------------------------------
# Selection errors
# ----------------------------------------------------------------------------------------------


def test_lora_on_model_without_peft(bert_plain):
    with pytest.raises(BlockSelectionError, match="get_peft_model") as err:
        select_blocks(bert_plain, "lora")
    assert "'linear'" in str(err.value)  # points to the alternatives
    assert isinstance(err.value, HyperinfError) and isinstance(err.value, ValueError)


def test_unknown_name_suggests_close_names(bert_plain):
    with pytest.raises(BlockSelectionError) as err:
        select_blocks(bert_plain, ["bert.encoder.layer.1.attention.self.querry"])
    msg = str(err.value)
    assert "'bert.encoder.layer.1.attention.self.querry'" in msg
    assert "Did you mean" in msg and "'bert.encoder.layer.1.attention.self.query'" in msg


def test_unknown_name_without_close_match_names_it(bert_plain):
    with pytest.raises(BlockSelectionError, match="no module named 'zzz_nothing_like_it'"):
        select_blocks(bert_plain, ["zzz_nothing_like_it"])


def test_peft_prefix_missing_suggests_full_name(bert_lora):
    with pytest.raises(BlockSelectionError, match=re.escape("base_model.model.bert.pooler.dense")):
        select_blocks(bert_lora, ["bert.pooler.dense"])


def test_non_linear_module_without_linear_children(bert_plain):
    with pytest.raises(BlockSelectionError) as err:
        select_blocks(bert_plain, ["classifier", "bert.embeddings.word_embeddings"])
    msg = str(err.value)
    assert "'bert.embeddings.word_embeddings'" in msg and "Embedding" in msg and "nn.Linear" in msg
    with pytest.raises(BlockSelectionError, match="LayerNorm"):
        select_blocks(bert_plain, ["bert.encoder.layer.1.output.LayerNorm"])


def test_empty_list(bert_plain):
    with pytest.raises(BlockSelectionError, match="empty"):
        select_blocks(bert_plain, [])


@pytest.mark.parametrize("spec", ["all", "LoRA", "classifier"])
def test_unknown_string_spec(bert_plain, spec):
    with pytest.raises(BlockSelectionError) as err:
        select_blocks(bert_plain, spec)
    msg = str(err.value)
    assert repr(spec) in msg and "'lora'" in msg and "'linear'" in msg and "list of module names" in msg


def test_linear_on_model_without_linear():
    with pytest.raises(BlockSelectionError, match="no nn.Linear"):
        select_blocks(nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU()), "linear")


def test_bad_side():
    with pytest.raises(ValueError, match="side"):
        select_blocks(mlp(), "linear", side="left")


# ----------------------------------------------------------------------------------------------
# Errors raised while computing per-sample gradients
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def mlp_setup():
    model = mlp()
    return model, select_blocks(model, "linear"), mlp_batch(4)


def test_scalar_loss_raises(mlp_setup):
    model, blocks, batch = mlp_setup

    def mean_loss(m, b):
        return mlp_loss(m, b).mean()

    with pytest.raises(LossShapeError, match="reduction='none'") as err:
        PerSampleGradients(model, mean_loss, blocks)(batch)
    assert "shape [B]" in str(err.value) and "()" in str(err.value)


def test_two_dimensional_loss_raises(mlp_setup):
    model, blocks, batch = mlp_setup
    with pytest.raises(LossShapeError, match=re.escape("(4, 1)")):
        PerSampleGradients(model, lambda m, b: mlp_loss(m, b)[:, None], blocks)(batch)


def test_non_tensor_loss_raises(mlp_setup):
    model, blocks, batch = mlp_setup
    with pytest.raises(LossShapeError, match="float"):
        PerSampleGradients(model, lambda m, b: 1.0, blocks)(batch)


def test_loss_under_no_grad_raises(mlp_setup):
    model, blocks, batch = mlp_setup

    def detached_loss(m, b):
        with torch.no_grad():
            return mlp_loss(m, b)

    with pytest.raises(LossShapeError, match="no_grad"):
        PerSampleGradients(model, detached_loss, blocks)(batch)
    # nothing left behind by the failed call
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_loss_count_differs_from_batch_size_raises(mlp_setup):
    model, blocks, batch = mlp_setup
    with pytest.raises(LossShapeError, match="3 losses") as err:
        PerSampleGradients(model, lambda m, b: mlp_loss(m, b)[:3], blocks)(batch, batch_index=2)
    assert "leading dimension 4" in str(err.value) and "batch 2" in str(err.value)


def test_nan_input_raises_with_block_and_batch_index(mlp_setup):
    model, blocks, (x, y) = mlp_setup
    x = x.clone()
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError) as err:
        PerSampleGradients(model, mlp_loss, blocks)((x, y), batch_index=3)
    msg = str(err.value)
    assert re.search(r"\b3\b", msg), msg
    assert "'fc1'" in msg  # the first block whose gradients are not finite
    assert isinstance(err.value, FloatingPointError)


def test_block_not_called_raises():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    blocks = select_blocks(model, ["net.fc1", "unused"])
    with pytest.raises(BlockSelectionError, match="'unused' was not called") as err:
        PerSampleGradients(model, mlp_loss, blocks)(mlp_batch(2), batch_index=5)
    assert "batch 5" in str(err.value)


def test_bert_loss_scalar_raises(bert_lora):
    blocks = select_blocks(bert_lora, "lora")

    def hf_mean_loss(m, b):
        return m(**b).loss  # the model's own loss is a batch mean

    with pytest.raises(LossShapeError):
        PerSampleGradients(bert_lora, hf_mean_loss, blocks)(random_padded_batch(3))
