"""Per-sample gradients from hooks against a loop of single-example backward calls."""

from __future__ import annotations

import pytest
import torch
from models import (
    bert_loss,
    max_relative_error,
    mlp,
    mlp_batch,
    mlp_loss,
    pad_batch,
    random_padded_batch,
    reference_gradients,
    split_examples,
    tiny_bert_lora,
    unpadded_examples,
)
from torch import nn

from hyperinf.blocks import select_blocks
from hyperinf.errors import LossShapeError
from hyperinf.gradients import BatchGradients, PerSampleGradients

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

R = 4
HIDDEN = 32
LORA_TARGETS = ("query", "value", "intermediate.dense")  # intermediate: Linear(32 -> 64), d_in != d_out
PREFIX = "base_model.model."
CLASSIFIER = PREFIX + "classifier.modules_to_save.default"  # the trainable head peft wraps for SEQ_CLS
POOLER = PREFIX + "bert.pooler.dense"
LAST_LAYER = PREFIX + "bert.encoder.layer.1"


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert_lora(r=R, target_modules=LORA_TARGETS)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    # lengths 10, ..., 2: every example but the first is padded
    return random_padded_batch(5, max_len=10, min_len=2, seed=1)


def _check_against_loop(model, loss_fn, batch, examples, blocks, *, dtype, tol) -> BatchGradients:
    out = PerSampleGradients(model, loss_fn, blocks, dtype=dtype)(batch)
    ref = reference_gradients(model, loss_fn, examples, blocks)
    assert set(out.grads) == {b.name for b in blocks}
    for block in blocks:
        g = out.grads[block.name]
        assert g.shape == (len(examples), *block.shape), block.name
        assert g.dtype == dtype
        err = max_relative_error(g, ref[block.name])
        assert err <= tol, f"{block.name}: relative error {err:.2e} > {tol:.0e}"
    ref_losses = torch.cat([loss_fn(model, ex).detach() for ex in examples])
    assert out.losses.shape == (len(examples),)
    assert not out.losses.requires_grad
    torch.testing.assert_close(out.losses.to(ref_losses.dtype), ref_losses, rtol=1e-5, atol=1e-6)
    return out


# ----------------------------------------------------------------------------------------------
# LoRA blocks on a padded BERT batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attn, dtype, tol",
    [
        ("eager", torch.float32, 1e-5),
        ("sdpa", torch.float32, 1e-5),
        ("eager", torch.float64, 1e-10),
    ],
)
def test_lora_per_sample_gradients_match_single_example_loop(attn, dtype, tol, batch):
    model = tiny_bert_lora(r=R, target_modules=LORA_TARGETS, attn_implementation=attn, dtype=dtype)
    blocks = select_blocks(model, "lora")
    assert len(blocks) == 2 * 2 * len(LORA_TARGETS)
    # the reference runs each example unpadded, truncated to its own length
    examples = unpadded_examples(batch)
    assert len({ex["input_ids"].shape[1] for ex in examples}) > 1
    out = _check_against_loop(model, bert_loss, batch, examples, blocks, dtype=dtype, tol=tol)
    for block in blocks:
        g = out.grads[block.name]
        d_out, d_in = block.module.weight.shape
        if ".lora_A." in block.name:  # r x d_in, as is
            assert g.shape[1:] == (R, d_in) == tuple(block.module.weight.shape)
        else:  # lora_B weight is d_out x r: laid out transposed, r x d_out
            assert ".lora_B." in block.name
            assert g.shape[1:] == (R, d_out) == tuple(block.module.weight.T.shape)
        # lora_B was perturbed away from zero, so every adapter gets a real gradient
        assert (g.flatten(1).norm(dim=1) > 0).all(), block.name


def test_lora_b_gradient_is_transpose_of_param_grad(bert):
    """On a single unpadded example, the lora_B block equals ``param.grad.T`` from a plain backward."""
    example = unpadded_examples(random_padded_batch(1, max_len=7, seed=5))[0]
    blocks = [b for b in select_blocks(bert, "lora") if "intermediate.dense.lora_B" in b.name]
    assert len(blocks) == 2
    out = PerSampleGradients(bert, bert_loss, blocks)(example)
    for block in blocks:
        weight = block.module.weight
        weight.grad = None
        bert_loss(bert, example).sum().backward()
        expected = weight.grad.T.clone()
        bert.zero_grad(set_to_none=True)
        assert expected.shape == (R, 64)
        torch.testing.assert_close(out.grads[block.name][0], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.grads[block.name][0], block.layout(expected.T), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Dense blocks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("include_bias", [True, False])
def test_mlp_dense_blocks_match_loop(side, include_bias):
    model = mlp()
    batch = mlp_batch(6)
    blocks = select_blocks(model, "linear", side=side, include_bias=include_bias)
    assert [b.name for b in blocks] == ["fc1", "fc2", "out"]
    out = _check_against_loop(model, mlp_loss, batch, split_examples(batch), blocks, dtype=torch.float32, tol=1e-5)
    fc1 = out.grads["fc1"]  # Linear(6 -> 8)
    d_in = 6 + int(include_bias)
    assert fc1.shape[1:] == ((8, d_in) if side == "in" else (d_in, 8))


def test_mlp_bias_column_is_the_bias_gradient():
    model = mlp()
    batch = mlp_batch(4)
    with_bias = PerSampleGradients(model, mlp_loss, select_blocks(model, "linear"))(batch).grads
    without = PerSampleGradients(model, mlp_loss, select_blocks(model, "linear", include_bias=False))(batch).grads
    for name in with_bias:
        torch.testing.assert_close(with_bias[name][..., :-1], without[name])
    # the bias gradient of the output layer of a softmax cross-entropy is softmax(logits) - onehot(y)
    x, y = batch
    p = torch.softmax(model(x), dim=-1).detach()
    expected = p - nn.functional.one_hot(y, 3).to(p.dtype)
    torch.testing.assert_close(with_bias["out"][..., -1], expected, rtol=1e-5, atol=1e-6)


def test_float64_output_dtype_from_float32_model():
    model = mlp()
    batch = mlp_batch(3)
    blocks = select_blocks(model, "linear")
    out = PerSampleGradients(model, mlp_loss, blocks, dtype=torch.float64)(batch)
    ref = reference_gradients(model, mlp_loss, split_examples(batch), blocks)
    for name, g in out.grads.items():
        assert g.dtype == torch.float64
        assert max_relative_error(g, ref[name]) <= 1e-5


def test_bert_dense_blocks_head_pooler_and_last_layer_match_loop(bert, batch):
    blocks = select_blocks(bert, [CLASSIFIER, POOLER, LAST_LAYER])
    names = [b.name for b in blocks]
    assert names[:2] == [CLASSIFIER, POOLER]
    under_last = [n for n in names if n.startswith(LAST_LAYER + ".")]
    # every nn.Linear under the last layer: query/value base layers + their LoRA A/B, key,
    # attention output, intermediate base + LoRA A/B, output dense
    expected_under = sorted(
        n for n, m in bert.named_modules() if n.startswith(LAST_LAYER + ".") and isinstance(m, nn.Linear)
    )
    assert sorted(under_last) == expected_under
    assert len(under_last) == 12
    assert len(names) == 14
    # frozen base-model layers (requires_grad False under peft) are attributed too
    assert not bert.get_submodule(POOLER).weight.requires_grad
    out = _check_against_loop(bert, bert_loss, batch, unpadded_examples(batch), blocks, dtype=torch.float32, tol=1e-5)
    assert out.grads[CLASSIFIER].shape[1:] == (2, HIDDEN + 1)
    assert out.grads[LAST_LAYER + ".output.dense"].shape[1:] == (HIDDEN, 64 + 1)


def test_bert_dense_blocks_side_out(bert, batch):
    blocks = select_blocks(bert, [CLASSIFIER, LAST_LAYER + ".intermediate.dense.base_layer"], side="out")
    out = _check_against_loop(bert, bert_loss, batch, unpadded_examples(batch), blocks, dtype=torch.float32, tol=1e-5)
    assert out.grads[CLASSIFIER].shape[1:] == (HIDDEN + 1, 2)


@pytest.mark.parametrize("spec", [[PREFIX + "classifier"], "linear"], ids=["classifier-container", "linear"])
def test_peft_head_container_and_linear_spec_select_only_active_modules(bert, batch, spec):
    blocks = select_blocks(bert, spec)
    out = PerSampleGradients(bert, bert_loss, blocks)(batch)
    assert CLASSIFIER in out.grads
    assert not any(".original_module" in n for n in out.grads)


# ----------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------


def test_extra_padding_leaves_gradients_unchanged(bert, batch):
    blocks = select_blocks(bert, "lora") + select_blocks(bert, [CLASSIFIER, LAST_LAYER + ".output.dense"])
    psg = PerSampleGradients(bert, bert_loss, blocks)
    base = psg(batch)
    for extra in (1, 7):
        padded = pad_batch(batch, extra)
        assert padded["input_ids"].shape[1] == batch["input_ids"].shape[1] + extra
        more = psg(padded)
        torch.testing.assert_close(more.losses, base.losses, rtol=1e-5, atol=1e-6)
        for name in base.grads:
            assert max_relative_error(more.grads[name], base.grads[name]) <= 1e-5, name


class _LeakyTokenModel(nn.Module):
    """Per-token scores summed over *all* positions, padding included: the model leaks into padding."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.emb = nn.Embedding(20, 5)
        self.lin = nn.Linear(5, 4)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(20, 5, generator=gen))
            self.lin.weight.copy_(torch.randn(4, 5, generator=gen))
            self.lin.bias.copy_(torch.randn(4, generator=gen))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(self.emb(input_ids))).pow(2).sum(dim=(1, 2))


def _leaky_loss(model, batch):
    return model(batch["input_ids"])


def test_padding_positions_are_masked_even_if_the_model_leaks_into_them():
    model = _LeakyTokenModel()
    batch = random_padded_batch(4, max_len=6, min_len=2, vocab_size=20, seed=2)
    blocks = select_blocks(model, ["lin"])
    out = PerSampleGradients(model, _leaky_loss, blocks)(batch)
    # the per-token loss terms are independent, so the gradient without the padding positions is
    # the single-example gradient on the truncated example
    ref = reference_gradients(model, _leaky_loss, unpadded_examples(batch), blocks)
    assert max_relative_error(out.grads["lin"], ref["lin"]) <= 1e-5
    # sanity: with padding counted, the gradient would differ (the padding embedding is not zero)
    full = reference_gradients(
        model, _leaky_loss, [{"input_ids": batch["input_ids"][i : i + 1]} for i in range(4)], blocks
    )
    assert max_relative_error(full["lin"][1:], ref["lin"][1:]) > 1e-2


class _PairsAndHead(nn.Module):
    """A Linear on two positions per token (input ``[B, T, 2, 2]``) whose per-position terms are
    summed over every position, padding included (the model leaks into padding), plus a head on
    the masked mean embedding (input ``[B, 4]``). ``drop_first`` feeds the token layer all
    positions but the first, a sequence the batch's attention_mask does not describe."""

    def __init__(self, drop_first: bool = False) -> None:
        super().__init__()
        self.drop_first = drop_first
        self.emb = nn.Embedding(20, 4)
        self.pairs = nn.Linear(2, 3)
        self.head = nn.Linear(4, 1)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1)
        tokens = (h[:, 1:] if self.drop_first else h).unflatten(-1, (2, 2))
        per_position = torch.tanh(self.pairs(tokens)).pow(2).sum(dim=(1, 2, 3))
        return per_position + self.head(pooled).squeeze(-1)


def _pairs_loss(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def test_mask_covers_every_position_of_a_token_and_skips_pooled_inputs():
    """``[B, T, 2, d]``: both positions of a padding token are masked; ``[B, d]``: not masked."""
    model = _PairsAndHead()
    batch = random_padded_batch(4, max_len=6, min_len=2, vocab_size=20, seed=2)
    blocks = select_blocks(model, ["pairs", "head"])
    out = PerSampleGradients(model, _pairs_loss, blocks)(batch)
    ref = reference_gradients(model, _pairs_loss, unpadded_examples(batch), blocks)
    for name in ("pairs", "head"):
        assert max_relative_error(out.grads[name], ref[name]) <= 1e-5, name
    # sanity: with the padding positions counted, the token layer's gradient would differ
    with_padding = [{key: batch[key][i : i + 1] for key in ("input_ids", "attention_mask")} for i in range(4)]
    full = reference_gradients(model, _pairs_loss, with_padding, blocks)
    assert max_relative_error(full["pairs"][1:], ref["pairs"][1:]) > 1e-2


def test_mask_that_does_not_match_the_token_axis_is_an_error():
    model = _PairsAndHead(drop_first=True)
    batch = random_padded_batch(4, max_len=6, min_len=2, vocab_size=20, seed=2)
    psg = PerSampleGradients(model, _pairs_loss, select_blocks(model, ["pairs"]))
    expected = r"'pairs' in batch 3: .* padding mask has shape \(4, 6\), but the layer's input has shape \(4, 5, 2, 2\)"
    with pytest.raises(LossShapeError, match=expected + ".*Fix:"):
        psg(batch, batch_index=3)


# ----------------------------------------------------------------------------------------------
# Side effects on the model
# ----------------------------------------------------------------------------------------------


def _hook_counts(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()
    }


def test_param_grads_untouched_and_flags_and_hooks_restored():
    model = tiny_bert_lora(r=R)
    blocks = select_blocks(model, "lora") + select_blocks(
        model, [CLASSIFIER, POOLER, LAST_LAYER + ".attention.self.key"]
    )
    user_frozen = blocks[0].module.weight
    user_frozen.requires_grad_(False)  # a LoRA weight the user froze stays frozen
    sentinel_param = blocks[1].module.weight
    sentinel = torch.full_like(sentinel_param, 7.0)
    sentinel_param.grad = sentinel.clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags[POOLER + ".weight"] is False and flags[CLASSIFIER + ".weight"] is True
    hooks = _hook_counts(model)

    out = PerSampleGradients(model, bert_loss, blocks)(random_padded_batch(3, seed=4))

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _hook_counts(model) == hooks
    torch.testing.assert_close(sentinel_param.grad, sentinel)
    assert all(p.grad is None for p in model.parameters() if p is not sentinel_param)
    # frozen blocks still got real gradients
    for name in (POOLER, LAST_LAYER + ".attention.self.key", blocks[0].name):
        assert out.grads[name].abs().sum() > 0, name


def test_flags_and_hooks_restored_when_loss_fn_raises():
    model = tiny_bert_lora(r=R)
    blocks = select_blocks(model, [POOLER, CLASSIFIER])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = _hook_counts(model)

    def broken_loss(m, b):
        m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PerSampleGradients(model, broken_loss, blocks)(random_padded_batch(2))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _hook_counts(model) == hooks


def test_works_under_no_grad_context():
    model = mlp()
    batch = mlp_batch(3)
    blocks = select_blocks(model, "linear")
    expected = PerSampleGradients(model, mlp_loss, blocks)(batch).grads
    with torch.no_grad():
        got = PerSampleGradients(model, mlp_loss, blocks)(batch).grads
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


# ----------------------------------------------------------------------------------------------
# Weight sharing
# ----------------------------------------------------------------------------------------------


class _SharedLinear(nn.Module):
    """The same Linear applied twice per forward, on sequences [B, T, d]."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h) + x)
        return self.head(h.mean(dim=1))


def test_module_called_twice_gets_sum_of_both_contributions():
    model = _SharedLinear()
    gen = torch.Generator().manual_seed(8)
    batch = (torch.randn(4, 3, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen))
    blocks = select_blocks(model, "linear")
    out = _check_against_loop(model, mlp_loss, batch, split_examples(batch), blocks, dtype=torch.float32, tol=1e-5)

    # the two contributions, from an untied copy (shared -> first, second): both matter, and they add
    untied = _UntiedLinear(model)
    ublocks = select_blocks(untied, ["first", "second"])
    parts = reference_gradients(untied, mlp_loss, split_examples(batch), ublocks)
    total = parts["first"] + parts["second"]
    assert max_relative_error(out.grads["shared"], total) <= 1e-5
    for part in (parts["first"], parts["second"]):
        assert max_relative_error(part, total) > 0.1


class _UntiedLinear(nn.Module):
    """:class:`_SharedLinear` with the shared layer copied into two independent layers."""

    def __init__(self, tied: _SharedLinear) -> None:
        super().__init__()
        import copy

        self.first = copy.deepcopy(tied.shared)
        self.second = copy.deepcopy(tied.shared)
        self.head = copy.deepcopy(tied.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        h = torch.tanh(self.second(h) + x)
        return self.head(h.mean(dim=1))


# ----------------------------------------------------------------------------------------------
# In-place ops on a block's output
# ----------------------------------------------------------------------------------------------


class _InplaceOnOutput(nn.Module):
    """Scales a Linear's output in place (legal for autograd: addmm does not save its output)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(9)
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        y.mul_(3.0)
        return self.head(torch.tanh(y))


def test_inplace_op_on_block_output_after_the_layer():
    model = _InplaceOnOutput()
    gen = torch.Generator().manual_seed(10)
    batch = (torch.randn(4, 4, generator=gen), torch.randint(0, 3, (4,), generator=gen))
    blocks = select_blocks(model, ["lin"])
    _check_against_loop(model, mlp_loss, batch, split_examples(batch), blocks, dtype=torch.float32, tol=1e-5)
