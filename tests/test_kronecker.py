"""K-FAC and EK-FAC against explicit token sums, Kronecker products and the exact block Fisher (float64).

The references (:func:`models.reference_kronecker`) come from one forward and backward call per
example and ``torch.kron``; the engine's curvature is read back from its preconditioner as the
matrix ``(Q_r (x) Q_d) diag(vec Lambda) (Q_r (x) Q_d)^T`` (:func:`models.fitted_kronecker`).
"""

from __future__ import annotations

import functools

import pytest
import torch
from models import (
    bert_loss,
    fitted_kronecker,
    mlp,
    mlp_batch,
    mlp_loss,
    pad_batch,
    random_padded_batch,
    reference_gradients,
    reference_kronecker,
    split_examples,
    tiny_bert_lora,
    unpadded_examples,
)
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine
from hyperinf.errors import ConfigurationError

KRONECKER = ["kfac", "ekfac"]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def engine_of(model, loss_fn=mlp_loss, **options) -> InfluenceEngine:
    options = {"blocks": "linear", "dtype": "float64", "progress": False, "method": "kfac", **options}
    return InfluenceEngine(model, loss_fn, **options)


def fit(engine: InfluenceEngine, loader) -> InfluenceEngine:
    return engine.fit(loader, methods=KRONECKER)


@pytest.mark.parametrize("side", ["in", "out"])
def test_one_example_of_one_token_kfac_and_ekfac_are_the_empirical_fisher(side):
    model = mlp(dtype=torch.float64)
    x, y = mlp_batch(1, dtype=torch.float64)
    engine = fit(engine_of(model, side=side), DataLoader(TensorDataset(x, y), batch_size=1))
    reference = reference_kronecker(model, mlp_loss, [(x, y)], engine.blocks)
    for method in KRONECKER:
        pre = engine.preconditioner(method)
        for block in engine.blocks:
            fisher = reference[block.name]["fisher"]
            # measured <= 2.3e-15 (K-FAC: S (x) A = delta delta^T (x) a a^T = vec(g) vec(g)^T)
            assert relative(fitted_kronecker(pre, block.name), fisher) < 1e-13, (method, block.name)


def token_model() -> tuple[torch.nn.Module, callable]:
    """An MLP applied to every token of ``x [B, T, 3]``; an example's loss is its tokens' summed cross-entropy."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()

    def loss_fn(m, batch):
        x, y = batch
        logits = m(x)
        return (
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)
        )

    return model, loss_fn


def test_one_example_of_several_tokens_ekfac_keeps_the_fisher_diagonal_in_its_basis_only():
    """With tokens ``G = sum_t delta_t a_t^T`` is no rank-one Kronecker product: EK-FAC is exact on the diagonal in its basis, not off it."""
    torch.manual_seed(0)
    model, loss_fn = token_model()
    x, y = torch.randn(1, 5, 3, dtype=torch.float64), torch.randint(0, 2, (1, 5))
    engine = fit(engine_of(model, loss_fn), DataLoader(TensorDataset(x, y), batch_size=1))
    pre = engine.preconditioner("ekfac")
    reference = reference_kronecker(model, loss_fn, [(x, y)], engine.blocks)
    for block in engine.blocks:
        fisher, ekfac = reference[block.name]["fisher"], fitted_kronecker(pre, block.name)
        q = torch.kron(*pre.bases[block.name])
        # measured: diagonal 1.7e-15; the whole matrix off by 0.60 (block '0') and 0.66 (block '2'); K-FAC's by 1.8 and 4.2
        assert relative(torch.diag(q.T @ ekfac @ q), torch.diag(q.T @ fisher @ q)) < 1e-13
        assert relative(ekfac, fisher) > 0.1


@functools.cache
def mlp_problem(n: int = 64) -> tuple[torch.nn.Module, TensorDataset]:
    model = mlp(dtype=torch.float64)
    return model, TensorDataset(*mlp_batch(n, dtype=torch.float64, seed=1))


@pytest.mark.parametrize("side", ["in", "out"])
def test_factors_and_eigenvalue_pass_equal_a_loop_over_examples(side):
    model, train = mlp_problem()
    engine = fit(engine_of(model, side=side), DataLoader(train, batch_size=10))
    reference = reference_kronecker(model, mlp_loss, split_examples(train.tensors), engine.blocks)
    looped = reference_gradients(model, mlp_loss, split_examples(train.tensors), engine.blocks)
    kfac, ekfac = engine.preconditioner("kfac"), engine.preconditioner("ekfac")
    for block in engine.blocks:
        ref = reference[block.name]
        torch.testing.assert_close(ref["grads"], looped[block.name], rtol=1e-13, atol=1e-16)  # the reference's own G_k
        sums = engine.fitted.kronecker
        # measured <= 3.7e-16
        assert relative(sums.inputs[block.name], ref["inputs"]) < 1e-13
        assert relative(sums.outputs[block.name], ref["outputs"]) < 1e-13
        assert int(sums.tokens[block.name]) == len(train)
        assert relative(fitted_kronecker(kfac, block.name), ref["kfac"]) < 1e-13  # measured <= 1.6e-15
        # EK-FAC's eigenvalues: the mean over single-example gradients of their squares in the engine's bases
        q_r, q_d = ekfac.bases[block.name]
        expected = (q_r.T @ looped[block.name] @ q_d).square().mean(0)
        assert relative(ekfac.eigenvalues[block.name], expected) < 1e-13  # measured <= 1.8e-16
        assert relative(fitted_kronecker(ekfac, block.name), ref["ekfac"]) < 1e-12  # measured <= 2.7e-15


def test_relative_damping_is_a_tenth_of_the_mean_ekfac_eigenvalue():
    """kronfluence's heuristic damping (``damping=None``): 0.1 x mean(Lambda); ours with c = 0.1, mode "relative"."""
    model, train = mlp_problem()
    engine = fit(engine_of(model, method="ekfac"), DataLoader(train, batch_size=10))
    pre = engine.preconditioner("ekfac")
    for diag in pre.diagnostics:
        mean = float(pre.eigenvalues[diag.block].mean())
        assert diag.damping == pytest.approx(0.1 * mean, rel=1e-13)
        assert diag.eig_max == float(pre.eigenvalues[diag.block].max()) and diag.eig_min >= 0


def test_batch_size_does_not_change_the_factors_or_the_scores():
    model, train = mlp_problem()
    val = DataLoader(TensorDataset(*mlp_batch(7, dtype=torch.float64, seed=2)), batch_size=3)
    runs = []
    for batch_size in (1, 9, 64):
        loader = DataLoader(train, batch_size=batch_size)
        engine = fit(engine_of(model), loader)
        runs.append((engine.fitted.kronecker.named_tensors(), engine.score_methods(loader, val, KRONECKER).scores))
    for sums, scores in runs[1:]:
        for name, tensor in sums.items():  # measured <= 4e-16
            assert relative(tensor.double(), runs[0][0][name].double()) < 1e-13, name
        for method in KRONECKER:  # measured <= 2.1e-15
            assert relative(scores[method], runs[0][1][method]) < 1e-12


def test_many_more_examples_than_parameters_ekfac_is_closer_to_the_fisher_than_kfac_than_identity():
    model, train = mlp_problem(2000)  # blocks of 56, 90 and 33 parameters
    engine = fit(engine_of(model), DataLoader(train, batch_size=500))
    looped = reference_gradients(model, mlp_loss, split_examples(train.tensors), engine.blocks)
    for block in engine.blocks:
        flat = looped[block.name].reshape(len(train), -1)
        fisher = flat.T @ flat / len(train)
        identity = torch.eye(fisher.shape[0], dtype=fisher.dtype) * torch.trace(fisher) / fisher.shape[0]
        errors = {m: relative(fitted_kronecker(engine.preconditioner(m), block.name), fisher) for m in KRONECKER}
        errors["identity"] = relative(identity, fisher)
        # EK-FAC's Lambda is the Frobenius-best diagonal in K-FAC's basis, so ekfac <= kfac always. Measured
        # (fc1, fc2, out): ekfac 0.211, 0.0672, 0.0198; kfac 0.241, 0.0681, 0.0201; identity 0.88, 0.97, 0.95
        assert errors["ekfac"] < errors["kfac"] < errors["identity"], (block.name, errors)


@functools.cache
def bert_problem():
    model = tiny_bert_lora(dtype=torch.float64)
    batch = random_padded_batch(6, max_len=9, min_len=3, seed=3)
    return model, batch


def test_padding_adds_nothing_to_the_factors_or_the_scores():
    pytest.importorskip("peft")
    model, batch = bert_problem()
    padded = [pad_batch(batch, 4)]  # one batch of six, padded 4 columns past the longest example
    alone = unpadded_examples(batch)  # six batches of one, no padding
    val = [random_padded_batch(3, seed=4)]
    engines = [fit(engine_of(model, bert_loss, blocks="lora"), loader) for loader in (padded, alone)]
    sums = [e.fitted.kronecker.named_tensors() for e in engines]
    for name, tensor in sums[0].items():  # measured <= 9.1e-16
        assert relative(tensor.double(), sums[1][name].double()) < 1e-13, name
    assert int(sums[0][f"kron_tokens/{engines[0].blocks[0].name}"]) == int(batch["attention_mask"].sum())
    scores = [e.score_methods(loader, val, KRONECKER).scores for e, loader in zip(engines, (padded, alone))]
    for method in KRONECKER:  # measured <= 9.7e-15
        assert relative(scores[0][method], scores[1][method]) < 1e-12


def test_lora_blocks_of_a_tiny_bert_match_a_loop_over_examples():
    pytest.importorskip("peft")
    model, batch = bert_problem()
    names = [n for n, _ in model.named_modules() if n.endswith("layer.0.attention.self.query.lora_A.default")]
    names.append(names[0].replace("lora_A", "lora_B"))
    engine = fit(engine_of(model, bert_loss, blocks=names), [batch])
    assert [b.side for b in engine.blocks] == ["in", "out"]
    reference = reference_kronecker(model, bert_loss, unpadded_examples(batch), engine.blocks)
    for block in engine.blocks:
        ref = reference[block.name]
        for method in KRONECKER:  # measured <= 6e-15
            assert relative(fitted_kronecker(engine.preconditioner(method), block.name), ref[method]) < 1e-12, (
                block.name,
                method,
            )


@pytest.mark.parametrize("method", KRONECKER)
def test_self_influence_and_top_k_read_the_pairwise_matrix(method):
    """Self-influence is the diagonal of ``pairwise(train, train)``, top-k its extreme entries (pairwise: test_pairwise.py)."""
    model, train = mlp_problem()
    loader = DataLoader(train, batch_size=10)
    engine = fit(engine_of(model, method=method), loader)
    pair = engine.pairwise(loader, loader)
    assert relative(engine.self_influence(loader), torch.diagonal(pair)) < 1e-13  # measured <= 2.2e-16
    top = engine.top_k(loader, loader, k=3)
    torch.testing.assert_close(top.harmful_scores, pair.topk(3, dim=0).values.T, rtol=1e-13, atol=0)
    torch.testing.assert_close(top.helpful_scores, (-pair).topk(3, dim=0).values.T.neg(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("method", KRONECKER)
def test_zero_damping_on_a_singular_curvature_is_refused(method):
    """One example: the factors have rank one, so without damping K-FAC / EK-FAC would divide by zero (or, where
    rounding leaves a tiny positive eigenvalue, by it: only exact zeros are caught)."""
    model = mlp(dtype=torch.float64)
    loader = DataLoader(TensorDataset(*mlp_batch(1, dtype=torch.float64)), batch_size=1)
    engine = fit(engine_of(model, method=method, damping=0.0), loader)
    with pytest.raises(ConfigurationError, match=f"method '{method}' would divide by zero on block\\(s\\) .*out"):
        engine.score(loader, loader)
