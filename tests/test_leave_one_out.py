"""Influence against real leave-one-out retraining on an L2-regularised logistic regression (convex).

Removing example k moves the optimum by about ``(1/n) H^{-1} g_k``, so the validation loss changes
by about ``(1/n) v^T H^{-1} g_k = -score_k / n``: scores should correlate with the measured
decrease ``L_val(theta) - L_val(theta_{-k})``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf.engine import InfluenceEngine

N_TRAIN, N_VAL, N_REMOVED, FEATURES, L2 = 120, 60, 40, 4, 1e-2


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(batch[0]).squeeze(-1), batch[1], reduction="none")


def objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = x @ theta[:-1] + theta[-1]
    return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * L2 * theta.square().sum()


def train_newton(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Minimise the (strictly convex) objective to machine precision with Newton's method."""
    for _ in range(50):
        grad = torch.autograd.functional.jacobian(lambda t: objective(t, x, y), theta)
        if grad.norm() < 1e-13:
            break
        hess = torch.autograd.functional.hessian(lambda t: objective(t, x, y), theta)
        theta = theta - torch.linalg.solve(hess, grad)
    return theta


def val_loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.binary_cross_entropy_with_logits(x @ theta[:-1] + theta[-1], y))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_exact_hessian_influence_predicts_leave_one_out(capsys):
    torch.manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, FEATURES, dtype=torch.float64)
    w_true = torch.tensor([1.5, -2.0, 0.5, 1.0], dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ w_true + 0.3)).double()
    x_tr, y_tr, x_val, y_val = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    theta = train_newton(x_tr, y_tr, torch.zeros(FEATURES + 1, dtype=torch.float64))
    base = val_loss(theta, x_val, y_val)
    decrease = []
    for k in range(N_REMOVED):
        keep = torch.arange(N_TRAIN) != k
        theta_k = train_newton(x_tr[keep], y_tr[keep], theta)
        decrease.append(base - val_loss(theta_k, x_val, y_val))
    decrease = torch.tensor(decrease, dtype=torch.float64)

    model = nn.Sequential(nn.Linear(FEATURES, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(theta[:-1][None])
        model[0].bias.copy_(theta[-1:])
    train_loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32)
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=32)
    methods = ["exact-hessian", "exact", "hyperinf", "datainf", "lissa", "tracin"]
    # Absolute damping = the L2 strength, so "exact-hessian" inverts the true Hessian of the objective.
    engine = InfluenceEngine(
        model, loss_fn, blocks=["0"], method="exact-hessian", damping=L2, damping_mode="absolute",
        dtype="float64", progress=False,
    )
    engine.fit(train_loader, methods=methods)
    correlations = {
        m: pearson(engine.score(train_loader, val_loader, method=m)[:N_REMOVED], decrease) for m in methods
    }
    with capsys.disabled():
        print("\nPearson(score, leave-one-out decrease of validation loss):", correlations)
    assert correlations["exact-hessian"] >= 0.9
