"""nn.Conv2d blocks: per-sample gradients, scores and Kronecker factors against references that never unfold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import max_relative_error, reference_gradients, split_examples
from torch import nn

from hyperinf import BlockSelectionError, InfluenceEngine
from hyperinf.blocks import select_blocks
from hyperinf.gradients import PerSampleGradients

F64 = torch.float64
CONVS = ["conv1", "conv2", "conv3"]


class SmallCNN(nn.Module):
    """Three convolutions covering padding, stride, an uneven dilated kernel and padding='same', then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2))  # 9 x 9 -> 4 x 4
        self.conv3 = nn.Conv2d(4, 2, 3, padding="same", bias=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.head(torch.tanh(self.conv3(x)).flatten(1))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 9, 9, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return SmallCNN().double()


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("include_bias", [True, False])
def test_per_sample_gradients_match_a_loop_of_single_example_backward_calls(model, side, include_bias):
    batch = images(5, seed=1)
    blocks = select_blocks(model, [*CONVS, "head"], side=side, include_bias=include_bias)
    out = PerSampleGradients(model, loss_fn, blocks, dtype=F64)(batch)
    reference = reference_gradients(model, loss_fn, split_examples(batch), blocks)
    for block in blocks:
        assert out.grads[block.name].shape == (5, *block.shape)
        assert max_relative_error(out.grads[block.name], reference[block.name]) <= 1e-12, block.name
    assert select_blocks(model, ["conv1"])[0].shape == (3, 2 * 3 * 3 + 1)  # C_out x (C_in kh kw + bias)


def test_exact_scores_on_convolutions_match_a_cholesky_solve_of_the_looped_gradients(model):
    train, val = images(12, seed=2), images(4, seed=3)
    engine = InfluenceEngine(model, loss_fn, blocks=CONVS, method="exact", dtype="float64", progress=False)
    scores = engine.fit([train]).score([train], [val])
    blocks = engine.blocks
    g_train = reference_gradients(model, loss_fn, split_examples(train), blocks)
    g_val = reference_gradients(model, loss_fn, split_examples(val), blocks)
    expected = torch.zeros(12, dtype=F64)
    for block in blocks:
        g = g_train[block.name]
        r, d = block.shape
        damping = 0.1 * g.square().sum() / (12 * r * d)  # the paper's relative damping, c = 0.1
        gfim = torch.einsum("nrd,nre->de", g, g) / 12 + damping * torch.eye(d, dtype=F64)
        h = torch.linalg.solve(gfim, g_val[block.name].mean(0).T).T  # v A^{-1}, A symmetric
        expected -= torch.einsum("nrd,rd->n", g, h)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_forward_mode_scores_convolutions_like_the_gradient_path(model):
    train, val = images(10, seed=4), images(3, seed=5)
    scores = {}
    for path in ("gradients", "jvp"):
        engine = InfluenceEngine(model, loss_fn, blocks=CONVS, dtype="float64", progress=False, pass2=path)
        scores[path] = engine.fit([train]).score([train], [val])
    torch.testing.assert_close(scores["jvp"], scores["gradients"], rtol=1e-9, atol=1e-12)


def test_kronecker_factors_sum_every_input_patch(model):
    """K-FAC's input factor of conv2 against patches cut out of the padded input by hand, one output pixel at a time."""
    batch = images(3, seed=6)
    block = select_blocks(model, ["conv2"])[0]
    gradients = PerSampleGradients(model, loss_fn, [block], dtype=F64, kronecker=True)
    factors = gradients(batch).factors["conv2"]
    a = torch.tanh(model.conv1(batch[0])).detach()  # conv2's input, [3, 3, 9, 9], no padding
    patches = []
    for i in range(4):
        for j in range(4):
            cut = a[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3 : 2]  # kernel (3, 2) with dilation (1, 2)
            patches.append(torch.cat([cut.reshape(3, -1), torch.ones(3, 1, dtype=F64)], dim=1))
    stacked = torch.cat(patches)
    torch.testing.assert_close(factors.inputs, stacked.T @ stacked)
    assert factors.tokens == 3 * 16 and factors.outputs.shape == (4, 4)


def test_unsupported_convolutions_are_refused_with_the_fix():
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(BlockSelectionError, match="groups=2.*groups=1 and zero padding; leave this layer out"):
        select_blocks(grouped, ["0"])
    uneven = nn.Sequential(nn.Conv2d(1, 1, 2, padding="same"))
    with pytest.raises(BlockSelectionError, match="padding='same' and an even kernel"):
        select_blocks(uneven, ["0"])
    with pytest.raises(BlockSelectionError, match=r"is a ReLU, not nn.Linear or nn.Conv2d"):
        select_blocks(nn.Sequential(nn.ReLU()), ["0"])
