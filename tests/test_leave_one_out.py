"""Influence against real leave-one-out retraining on L2-regularised logistic regressions (convex).

Removing example k (its weight in the mean training loss set to 0) moves the optimum by about
``(1/n) H^{-1} g_k``, so the validation loss changes by about ``(1/n) v^T H^{-1} g_k = -score_k / n``:
scores should correlate with the measured decrease ``L_val(theta) - L_val(theta_{-k})``.

The models are softmax regressions whose class 0 has the fixed logit 0 (``classes - 1`` rows of
weights, each with a bias column): with two classes that is binary logistic regression (one row,
so the GFIM is the FIM); with four it has three rows and the GFIM is not the FIM. Each is trained
to machine precision by Newton's method with its gradient and Hessian written out, once on the
full training set and once per removed example. Damping is absolute and equal to the L2
strength, so ``exact-hessian`` inverts the true Hessian of the training objective.

Every bound below was set from the correlations measured at the commit that wrote it, with the
margin stated next to it; each bound is also shown to fail for a wrong implementation: negated
scores, no damping (``damping=0``) and, where the features have very different scales so that
curvature matters, no curvature at all (``tracin``, ``h = v``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine

N_TRAIN, N_VAL, N_REMOVED, L2 = 120, 60, 40, 1e-2


@dataclass(frozen=True)
class Spec:
    classes: int
    scales: tuple[float, ...]  # standard deviation of each feature
    seed: int


SPECS = {
    # features of one scale: the damped curvature is close to a multiple of I, so even TracIn ranks well
    "binary-isotropic": Spec(2, (1.0, 1.0, 1.0, 1.0), 2),
    # feature scales over 2.5 decades: curvature (and damping, for the small directions) matter
    "binary-anisotropic": Spec(2, (10.0, 1.0, 0.1, 0.03), 0),
    # three rows of weights, so the d x d GFIM differs from the 3d x 3d FIM
    "multinomial": Spec(4, (10.0, 1.0, 0.1, 0.03), 0),
}

# Lower bounds on Pearson(score, leave-one-out decrease), with the values measured when they were set.
BOUNDS = {
    "binary-isotropic": {
        "exact-hessian": 0.98,  # measured 0.999
        "exact": 0.95,  # 0.993
        "hyperinf": 0.95,  # 0.993
        "lissa": 0.95,  # 0.996
        "datainf": 0.95,  # 0.982
        "tracin": 0.95,  # 0.975
    },
    "binary-anisotropic": {
        "exact-hessian": 0.98,  # 0.995; undamped 0.104
        "exact": 0.95,  # 0.989; undamped 0.397, no curvature (tracin) 0.295
        "hyperinf": 0.95,  # 0.989
        "lissa": 0.8,  # 0.912 (0.891 with one Neumann term fewer); tracin 0.295
    },
    "multinomial": {
        "exact-hessian": 0.98,  # 0.994; undamped 0.514
        "exact": 0.85,  # 0.937; undamped 0.568, tracin 0.553
        "hyperinf": 0.85,  # 0.937
        "exact-fim": 0.85,  # 0.931; undamped 0.273
        "hyperinf-fim": 0.85,  # 0.931
    },
}

# Wrong implementations each bound must reject: (what it stands for, method scored, damping, bound of).
WRONG = {
    "binary-isotropic": [],
    "binary-anisotropic": [
        ("missing damping", "exact-hessian", 0.0, "exact-hessian"),
        ("missing damping", "exact", 0.0, "exact"),
        ("identity curvature", "tracin", L2, "exact"),
        ("identity curvature", "tracin", L2, "lissa"),
    ],
    "multinomial": [
        ("missing damping", "exact-hessian", 0.0, "exact-hessian"),
        ("missing damping", "exact", 0.0, "exact"),
        ("missing damping", "exact-fim", 0.0, "exact-fim"),
        ("identity curvature", "tracin", L2, "exact"),
        ("identity curvature", "tracin", L2, "exact-fim"),
    ],
}


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def full_logits(rows: torch.Tensor) -> torch.Tensor:
    """Prepend class 0's fixed logit 0 to the ``classes - 1`` free logits ``[n, classes - 1]``."""
    return torch.cat([torch.zeros(len(rows), 1, dtype=rows.dtype), rows], dim=1)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(full_logits(model(batch[0])), batch[1], reduction="none")


def train_newton(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, theta: torch.Tensor, classes: int
) -> torch.Tensor:
    """Minimise ``(1/N_TRAIN) sum_i w_i loss_i + (L2/2) ||theta||^2`` (strictly convex) to machine precision.

    ``theta`` is the ``[classes - 1, d + 1]`` weight-and-bias matrix, flattened row-major.
    """
    xb = with_ones(x)
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    for _ in range(50):
        p = torch.softmax(full_logits(xb @ theta.reshape(classes - 1, -1).T), dim=1)[:, 1:]
        residual = (p - F.one_hot(y, classes)[:, 1:].to(p.dtype)) * weights[:, None]
        grad = (residual.T @ xb).reshape(-1) / N_TRAIN + L2 * theta
        if grad.norm() < 1e-14:
            return theta
        cov = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) * weights[:, None, None]
        hess = torch.einsum("icd,ij,ik->cjdk", cov, xb, xb).reshape_as(eye) / N_TRAIN + L2 * eye
        theta = theta - torch.linalg.solve(hess, grad)
    raise AssertionError("Newton's method did not reach machine precision in 50 steps")


@dataclass
class Problem:
    decrease: torch.Tensor  # [N_REMOVED] leave-one-out decrease of the validation loss
    model: nn.Module
    train: DataLoader
    val: DataLoader

    def scores(self, methods: list[str], damping: float = L2) -> dict[str, torch.Tensor]:
        engine = InfluenceEngine(
            self.model,
            loss_fn,
            blocks=["0"],
            method=methods[0],
            damping=damping,
            damping_mode="absolute",
            dtype="float64",
            progress=False,
        )
        engine.fit(self.train, methods=methods)
        return {m: engine.score(self.train, self.val, method=m) for m in methods}

    def correlation(self, scores: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([scores[:N_REMOVED], self.decrease]))[0, 1])


@functools.cache
def problem(name: str) -> Problem:
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(spec.seed)
    scales = torch.tensor(spec.scales, dtype=torch.float64)
    x = torch.randn(N_TRAIN + N_VAL, len(scales), generator=gen, dtype=torch.float64) * scales
    w_true = torch.randn(spec.classes - 1, len(scales), generator=gen, dtype=torch.float64) * 2 / scales
    y = torch.multinomial(torch.softmax(full_logits(x @ w_true.T), dim=1), 1, generator=gen).squeeze(1)
    x_tr, y_tr, x_val, y_val = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    def val_loss(theta: torch.Tensor) -> float:
        return float(F.cross_entropy(full_logits(with_ones(x_val) @ theta.reshape(spec.classes - 1, -1).T), y_val))

    ones = torch.ones(N_TRAIN, dtype=torch.float64)
    start = torch.zeros((spec.classes - 1) * (len(scales) + 1), dtype=torch.float64)
    theta = train_newton(x_tr, y_tr, ones, start, spec.classes)
    base = val_loss(theta)
    decrease = torch.tensor(
        [
            base - val_loss(train_newton(x_tr, y_tr, ones.index_fill(0, torch.tensor(k), 0.0), theta, spec.classes))
            for k in range(N_REMOVED)
        ],
        dtype=torch.float64,
    )

    linear = nn.Linear(len(scales), spec.classes - 1).double()
    with torch.no_grad():
        weights = theta.reshape(spec.classes - 1, -1)
        linear.weight.copy_(weights[:, :-1])
        linear.bias.copy_(weights[:, -1])
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=32)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=32)
    return Problem(decrease, nn.Sequential(linear), train, val)


@pytest.mark.parametrize("name", list(SPECS))
def test_influence_correlates_with_leave_one_out_retraining(name):
    prob = problem(name)
    bounds = BOUNDS[name]
    scores = prob.scores(list(dict.fromkeys([*bounds, "tracin"])))
    measured = {m: round(prob.correlation(s), 4) for m, s in scores.items()}
    for method, bound in bounds.items():
        assert measured[method] >= bound, (method, measured)
        assert prob.correlation(-scores[method]) < bound  # a sign error fails the bound
    undamped = sorted({method for _, method, damping, _ in WRONG[name] if damping == 0.0})
    by_damping = {L2: scores, 0.0: prob.scores(undamped, 0.0) if undamped else {}}
    for what, method, damping, bound_of in WRONG[name]:
        wrong = prob.correlation(by_damping[damping][method])
        assert wrong < bounds[bound_of], f"{what} ({method}, damping={damping}) passes {bound_of}'s bound: {wrong}"


@pytest.mark.parametrize("name", list(SPECS))
def test_exact_hessian_influence_has_the_scale_of_the_leave_one_out_change(name):
    """``score_k / n`` predicts the decrease itself, not just its ranking, which no correlation checks:
    scores off by a factor 2 measured a relative error of 0.84-1.03 here (by n, a sum where the mean
    belongs, about 1), no damping 2.6-2.9 on the anisotropic problems."""
    prob = problem(name)
    predicted = prob.scores(["exact-hessian"])["exact-hessian"][:N_REMOVED] / N_TRAIN
    error = float(torch.linalg.norm(predicted - prob.decrease) / torch.linalg.norm(prob.decrease))
    assert error < 0.3, error  # measured 0.09 (binary-isotropic), 0.12 (binary-anisotropic), 0.15 (multinomial)


def test_multinomial_hyperinf_equals_cholesky_and_the_gfim_is_not_the_fim():
    prob = problem("multinomial")
    scores = prob.scores(["exact", "hyperinf", "exact-fim", "hyperinf-fim"])
    for fast, exact in (("hyperinf", "exact"), ("hyperinf-fim", "exact-fim")):
        error = float((scores[fast] - scores[exact]).abs().max() / scores[exact].abs().max())
        assert error < 1e-12, (fast, error)  # measured below 1e-15
    gap = float(torch.linalg.norm(scores["exact"] - scores["exact-fim"]) / torch.linalg.norm(scores["exact-fim"]))
    assert gap > 0.1, gap  # measured 0.6: with r = 3 the two curvatures give different scores
