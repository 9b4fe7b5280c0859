"""The model, data and engine options both sides of the distributed test build: same seed, same weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

METHODS = [
    "hyperinf",
    "hyperinf-fim",
    "exact",
    "exact-fim",
    "exact-hessian",
    "exact-ggn",
    "datainf",
    "lissa",
    "tracin",
    "kfac",
    "ekfac",
]


# The untrained MLP's Hessian is indefinite (smallest eigenvalue -0.28); c = 30 (lambda_l = 0.52 and 2.0)
# makes it positive definite, so exact-hessian runs too.
def logits(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0])


def output_loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(outputs, batch[1], reduction="none")


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return output_loss(logits(model, batch), batch)


OPTIONS = {
    "blocks": "linear",
    "damping": 30.0,
    "dtype": "float64",
    "progress": False,
    "output_fn": logits,
    "output_loss": output_loss,
}


def problem() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(53, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (53,), generator=g)
    return model, TensorDataset(x[:41], y[:41]), TensorDataset(x[41:], y[41:])
