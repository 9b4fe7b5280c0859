"""The exact GGN ``(1/n) sum_i J_i^T H_i J_i`` against autograd's Jacobians, closed-form output Hessians and explicit solves."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine, LossShapeError
from hyperinf.errors import ConfigurationError

N_TRAIN, N_VAL, K = 20, 6, 3


def logits(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0])


def cross_entropy(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(outputs, batch[1], reduction="none")


def squared(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return 0.5 * (outputs - batch[1]).square().sum(1)


def softmax_hessian(outputs: torch.Tensor) -> torch.Tensor:
    """``d^2 CE / d f^2 = diag(p) - p p^T`` per example."""
    p = outputs.softmax(1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def identity_hessian(outputs: torch.Tensor) -> torch.Tensor:
    return torch.eye(outputs.shape[1], dtype=outputs.dtype).expand(outputs.shape[0], -1, -1)


LOSSES: dict[str, tuple[Callable[..., torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "cross-entropy": (cross_entropy, softmax_hessian),
    "squared": (squared, identity_hessian),
}


def make_model(hidden: int | None, seed: int = 0) -> nn.Module:
    """Softmax regression (``hidden=None``) or a tanh MLP, float64."""
    torch.manual_seed(seed)
    layers = [nn.Linear(4, K)] if hidden is None else [nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, K)]
    return nn.Sequential(*layers).double()


def make_data(loss: str, n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (
        torch.randint(0, K, (n,), generator=g)
        if loss == "cross-entropy"
        else torch.randn(n, K, generator=g, dtype=torch.float64)
    )
    return TensorDataset(x, y)


def engine_for(model: nn.Module, loss: str, **options) -> InfluenceEngine:
    output_loss = LOSSES[loss][0]
    return InfluenceEngine(
        model,
        lambda m, b: output_loss(logits(m, b), b),
        blocks="linear",
        method="exact-ggn",
        output_fn=logits,
        output_loss=output_loss,
        dtype="float64",
        progress=False,
        **options,
    )


class Reference:
    """The network as a function of its flattened ``[W | b]`` layouts (the engine's coordinates, block after block)."""

    def __init__(self, engine: InfluenceEngine) -> None:
        self.layouts = [b.layout(*(p.detach() for p in b.parameters())) for b in engine.blocks]
        self.theta = torch.cat([t.reshape(-1) for t in self.layouts])

    def outputs(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([t.numel() for t in self.layouts])
        for i, (piece, layout) in enumerate(zip(pieces, self.layouts)):
            weights = piece.reshape(layout.shape)
            x = x @ weights[:, :-1].T + weights[:, -1]
            x = torch.tanh(x) if i < len(pieces) - 1 else x
        return x

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``d f_ik / d theta``: ``[n, K, P]``."""
        return torch.autograd.functional.jacobian(lambda theta: self.outputs(theta, x), self.theta)

    def ggn(self, data: TensorDataset, output_hessian: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = data.tensors[0]
        j = self.jacobian(x)
        return torch.einsum("nkp,nkl,nlq->pq", j, output_hessian(self.outputs(self.theta, x)), j) / x.shape[0]

    def hessian(self, data: TensorDataset, output_loss: Callable[..., torch.Tensor]) -> torch.Tensor:
        x = data.tensors[0]
        return torch.autograd.functional.hessian(
            lambda theta: output_loss(self.outputs(theta, x), data.tensors).mean(), self.theta
        )


def test_the_ggn_of_softmax_regression_is_its_hessian():
    """Cross-entropy is convex in the logits and the logits are linear in the weights: J^T H J is the whole Hessian."""
    train = make_data("cross-entropy", N_TRAIN, seed=1)
    engine = engine_for(make_model(hidden=None), "cross-entropy").fit(DataLoader(train, batch_size=7))
    expected = Reference(engine).hessian(train, cross_entropy)
    assert float((engine.fitted.ggn - expected).abs().max()) < 1e-12  # measured 1.7e-16 (entries up to 0.35)


@pytest.mark.parametrize("loss", LOSSES)
def test_the_ggn_of_a_tanh_mlp_is_jt_h_j_and_psd_where_the_hessian_is_indefinite(loss):
    """Against autograd's Jacobian and the loss's closed-form output Hessian (softmax: diag(p) - pp^T; squared: I)."""
    output_loss, output_hessian = LOSSES[loss]
    train = make_data(loss, N_TRAIN, seed=1)
    engine = engine_for(make_model(hidden=5), loss).fit(DataLoader(train, batch_size=7))
    reference = Reference(engine)
    ggn = engine.fitted.ggn
    assert ggn.shape == (reference.theta.numel(),) * 2
    assert (
        float((ggn - reference.ggn(train, output_hessian)).abs().max()) < 1e-12
    )  # measured 5.6e-17 (CE), 1.4e-16 (squared)
    assert float(torch.linalg.eigvalsh(ggn)[0]) > -1e-12  # PSD up to rounding: lowest -2.5e-17 (CE), 7.4e-8 (squared)
    assert (
        float(torch.linalg.eigvalsh(reference.hessian(train, output_loss))[0]) < -1e-3
    )  # measured -0.44 (CE), -1.84 (squared)


def test_exact_ggn_scores_equal_an_explicit_solve():
    """``score_k = -g_k^T (G + lambda I)^{-1} v``, with ``g_k = J_k^T (p_k - e_{y_k})`` and ``G`` from autograd."""
    train, val = make_data("cross-entropy", N_TRAIN, seed=1), make_data("cross-entropy", N_VAL, seed=2)
    engine = engine_for(make_model(hidden=5), "cross-entropy", damping=0.1, damping_mode="absolute")
    scores = engine.fit(DataLoader(train, batch_size=7)).score(
        DataLoader(train, batch_size=7), DataLoader(val, batch_size=4)
    )
    reference = Reference(engine)

    def gradients(data: TensorDataset) -> torch.Tensor:
        x, y = data.tensors
        residual = reference.outputs(reference.theta, x).softmax(1) - F.one_hot(y, K).double()
        return torch.einsum("nkp,nk->np", reference.jacobian(x), residual)

    damped = reference.ggn(train, softmax_hessian) + 0.1 * torch.eye(reference.theta.numel(), dtype=torch.float64)
    expected = -gradients(train) @ torch.linalg.solve(damped, gradients(val).mean(0))
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-14)  # measured max relative error 8.7e-15


def test_exact_ggn_without_output_functions_is_a_configuration_error():
    train = DataLoader(make_data("cross-entropy", N_TRAIN, seed=1), batch_size=7)
    model = make_model(hidden=5)
    engine = InfluenceEngine(
        model, lambda m, b: cross_entropy(logits(m, b), b), blocks="linear", method="exact-ggn", progress=False
    )
    with pytest.raises(ConfigurationError, match=r"output_fn=.*output_loss=.*F\.cross_entropy"):
        engine.fit(train)
    with pytest.raises(ConfigurationError, match="output_fn was given without output_loss"):
        InfluenceEngine(model, lambda m, b: cross_entropy(logits(m, b), b), blocks="linear", output_fn=logits)


def test_an_output_loss_that_averages_the_batch_is_a_loss_shape_error():
    train = DataLoader(make_data("cross-entropy", N_TRAIN, seed=1), batch_size=7)
    engine = InfluenceEngine(
        make_model(hidden=5),
        lambda m, b: cross_entropy(logits(m, b), b),
        blocks="linear",
        method="exact-ggn",
        output_fn=logits,
        output_loss=lambda f, b: F.cross_entropy(f, b[1]),
        dtype="float64",
        progress=False,
    )
    with pytest.raises(
        LossShapeError, match=r"output_loss must return one loss per example, shape \[7\], got shape \(\)"
    ):
        engine.fit(train)


def test_the_ggn_of_a_deep_linear_network_with_a_squared_loss_is_kfacs_true_fisher_form():
    """Each diagonal block is ``B^T B (x) E[a a^T]`` (``a``: the layer's input with a 1 for the bias, ``B``: the later weights).

    The Jacobian of the outputs in a linear layer's output is ``B`` for every example and ``H = I``,
    so the block is exactly Kronecker: K-FAC with the true Fisher's output factor ``E[B^T H B]``.
    (The ``kfac`` method uses the empirical output factor ``E[delta delta^T] = B^T E[r r^T] B``
    instead: on this network it is neither the GGN block nor the empirical Fisher block, measured 92-117% and
    21-48% away from them in relative Frobenius norm.)
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, K)).double()
    train = make_data("squared", N_TRAIN, seed=1)
    engine = engine_for(model, "squared").fit(DataLoader(train, batch_size=7))
    layers, a, start = list(model), train.tensors[0], 0
    for i, block in enumerate(engine.blocks):
        later = torch.eye(layers[i].out_features, dtype=torch.float64)
        for layer in layers[i + 1 :]:
            later = layer.weight.detach() @ later
        inputs = torch.cat([a, torch.ones(N_TRAIN, 1, dtype=torch.float64)], dim=1)
        expected = torch.kron(later.T @ later, inputs.T @ inputs / N_TRAIN)
        got = engine.fitted.ggn[start : start + block.num_params, start : start + block.num_params]
        assert float((got - expected).abs().max()) < 1e-12, block.name  # measured <= 1.7e-16
        a, start = layers[i](a).detach(), start + block.num_params
