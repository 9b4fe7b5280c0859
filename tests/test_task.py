"""A Task: the measurement attributed on queries apart from the training loss, and the padding it names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import max_relative_error, reference_gradients, split_examples
from torch import nn

from hyperinf import ConfigurationError, InfluenceEngine, Task
from hyperinf.blocks import select_blocks
from hyperinf.gradients import PerSampleGradients

F64 = torch.float64


class MarginTask(Task):
    """Trained with cross-entropy; what is attributed on queries is the logit of class 0."""

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    def measurement(self, model, batch):
        return model(batch[0])[:, 0]


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def test_scores_attribute_the_measurement_with_the_training_loss_curvature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    task, train, val = MarginTask(), data(16, 1), data(4, 2)
    engine = InfluenceEngine(model, task, blocks="linear", method="exact", dtype="float64", progress=False)
    scores = engine.fit([train]).score([train], [val])
    g = reference_gradients(model, task.loss, split_examples(train), engine.blocks)
    q = reference_gradients(model, task.measurement, split_examples(val), engine.blocks)
    expected = torch.zeros(16, dtype=F64)
    for block in engine.blocks:
        r, d = block.shape
        damping = 0.1 * g[block.name].square().sum() / (16 * r * d)
        gfim = torch.einsum("nrd,nre->de", g[block.name], g[block.name]) / 16 + damping * torch.eye(d, dtype=F64)
        h = torch.linalg.solve(gfim, q[block.name].mean(0).T).T
        expected -= torch.einsum("nrd,rd->n", g[block.name], h)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    loss_only = InfluenceEngine(model, task.loss, blocks="linear", method="exact", dtype="float64", progress=False)
    assert not torch.allclose(loss_only.fit([train]).score([train], [val]), scores)  # the measurement mattered


class TokenTask(Task):
    """A loss that (wrongly) sums over padding too; the task names the padding under its own key."""

    def loss(self, model, batch):
        return model(batch["tokens"]).square().sum(dim=(1, 2))

    def padding_mask(self, batch):
        return batch["keep"]


def test_padding_named_by_the_task_contributes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    tokens = torch.randn(3, 6, 4, dtype=F64)
    lengths = [6, 4, 2]
    keep = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    blocks = select_blocks(model, "linear")
    task = TokenTask()
    out = PerSampleGradients(model, task.loss, blocks, dtype=F64, padding=task.padding_mask)(
        {"tokens": tokens, "keep": keep}
    )
    unpadded = [{"tokens": tokens[i : i + 1, :n]} for i, n in enumerate(lengths)]
    reference = reference_gradients(model, task.loss, unpadded, blocks)
    assert max_relative_error(out.grads["0"], reference["0"]) <= 1e-12


def test_a_task_defines_its_loss_and_its_own_outputs():
    with pytest.raises(NotImplementedError, match="Task must define loss"):
        InfluenceEngine(nn.Linear(2, 2), Task(), blocks="linear", progress=False).fit([torch.randn(3, 2)])
    with pytest.raises(ConfigurationError, match="define Task.output_functions"):
        InfluenceEngine(nn.Linear(2, 2), MarginTask(), blocks="linear", output_fn=lambda m, b: m(b[0]))
