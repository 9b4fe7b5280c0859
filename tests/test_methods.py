"""Each method against its own definition, computed naively from a loop of single-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf.blocks import select_blocks
from hyperinf.config import InfluenceConfig
from hyperinf.curvature import CurvatureAccumulator
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import ConfigurationError, NotConvergedWarning, NotSPDError
from hyperinf.methods import FittedInputs, build_preconditioner

N_TRAIN, N_VAL = 40, 12


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(N_TRAIN + N_VAL, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_VAL,))
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    val = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    return model, train, val


def loop_gradients(model: nn.Module, engine: InfluenceEngine, dataset: TensorDataset) -> dict[str, torch.Tensor]:
    """Reference per-sample gradients ``{name: [n, r, d]}`` from one backward call per example."""
    out: dict[str, list[torch.Tensor]] = {b.name: [] for b in engine.blocks}
    for x, y in dataset:
        model.zero_grad()
        loss_fn(model, (x[None], y[None])).sum().backward()
        for b in engine.blocks:
            out[b.name].append(b.layout(*(p.grad.clone() for p in b.parameters())))
    model.zero_grad()
    return {name: torch.stack(gs) for name, gs in out.items()}


def reference(model, engine, train, val, solve):
    """Scores ``-sum_l <solve(block, g_train, v_l), g_k>`` with per-block damping from the definition."""
    g = loop_gradients(model, engine, train)
    v = {name: t.mean(0) for name, t in loop_gradients(model, engine, val).items()}
    scores = torch.zeros(N_TRAIN, dtype=torch.float64)
    for b in engine.blocks:
        gb = g[b.name]
        lam = 0.1 * gb.square().sum() / (N_TRAIN * b.num_params)
        h = solve(gb, v[b.name], lam)
        scores -= torch.einsum("nrd,rd->n", gb, h)
    return scores


def gfim_solve(g, v, lam):
    a = torch.einsum("nrd,nre->de", g, g) / g.shape[0] + lam * torch.eye(g.shape[2], dtype=g.dtype)
    return torch.linalg.solve(a, v.T).T


def fim_solve(g, v, lam):
    flat = g.reshape(g.shape[0], -1)
    a = flat.T @ flat / g.shape[0] + lam * torch.eye(flat.shape[1], dtype=g.dtype)
    return torch.linalg.solve(a, v.reshape(-1)).reshape(v.shape)


def datainf_solve(g, v, lam):
    """DataInf's definition: the mean over examples of ``(lam I + g_i g_i^T)^{-1} v`` (flattened)."""
    flat = g.reshape(g.shape[0], -1)
    eye = torch.eye(flat.shape[1], dtype=g.dtype)
    hs = [torch.linalg.solve(lam * eye + torch.outer(gi, gi), v.reshape(-1)) for gi in flat]
    return torch.stack(hs).mean(0).reshape(v.shape)


def engine_for(model, method, **options):
    return InfluenceEngine(model, loss_fn, blocks="linear", method=method, dtype="float64", progress=False, **options)


@pytest.mark.parametrize(
    ("method", "solve"),
    [
        ("exact", gfim_solve),
        ("hyperinf", gfim_solve),
        ("exact-fim", fim_solve),
        ("hyperinf-fim", fim_solve),
        ("datainf", datainf_solve),
        ("tracin", lambda g, v, lam: v),
    ],
)
def test_method_matches_its_definition(problem, method, solve):
    model, train, val = problem
    engine = engine_for(model, method)
    loader = DataLoader(train, batch_size=8)
    engine.fit(loader)
    scores = engine.score(loader, DataLoader(val, batch_size=5))
    expected = reference(model, engine, train, val, solve)
    # float64; measured: 5e-14 absolute (1.2e-14 of the largest score), 7e-13 relative on the smallest scores
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12 * expected.abs().max())


def test_hyperinf_equals_exact_in_float32(problem):
    model, train, val = problem
    model32 = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    train32 = TensorDataset(train.tensors[0].float(), train.tensors[1])
    val32 = TensorDataset(val.tensors[0].float(), val.tensors[1])
    engine = InfluenceEngine(model32, loss_fn, blocks="linear", method="hyperinf", progress=False)
    loader = DataLoader(train32, batch_size=16)
    engine.fit(loader)
    fast = engine.score(loader, DataLoader(val32))
    exact = engine.score(loader, DataLoader(val32), method="exact")
    assert torch.linalg.norm(fast - exact) <= 1e-5 * torch.linalg.norm(exact)
    assert all(d.converged for d in engine.diagnostics() if d.method == "hyperinf")


def test_diagnostics_are_per_block_within_a_batched_inverse():
    """Two equal-size blocks are inverted in one Schulz call; only the ill-conditioned one is flagged."""
    model = nn.ModuleDict({"good": nn.Linear(16, 4), "bad": nn.Linear(16, 4)})
    curvature = CurvatureAccumulator(select_blocks(model, "linear", include_bias=False))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    curvature.gram["good"] = (q * torch.linspace(1.0, 10.0, 16)) @ q.T
    curvature.gram["bad"] = (q * torch.logspace(-7, 0, 16)) @ q.T  # condition 1e7: beyond float32
    curvature.count = 1
    config = InfluenceConfig.from_options(damping=0.0, damping_mode="absolute")
    with pytest.warns(NotConvergedWarning):
        pre = build_preconditioner("hyperinf", FittedInputs(curvature, config))
    good, bad = pre.diagnostics
    assert (good.block, bad.block) == ("good", "bad")
    assert good.converged and good.residual <= 1e-5
    assert not bad.converged and bad.residual > 1e-3


def test_lissa_approaches_exact_as_iterations_grow(problem):
    model, train, val = problem
    loader, val_loader = DataLoader(train, batch_size=8), DataLoader(val)
    exact = engine_for(model, "exact").fit(loader).score(loader, val_loader)
    errors = []
    for iters in (10, 100, 1000, 20000):
        lissa = engine_for(model, "lissa", lissa_iters=iters).fit(loader).score(loader, val_loader)
        errors.append(float(torch.linalg.norm(lissa - exact) / torch.linalg.norm(exact)))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors


def test_exact_hessian_matches_autograd_hessian(problem):
    model, train, val = problem
    engine = engine_for(model, "exact-hessian")
    loader = DataLoader(train, batch_size=16)
    engine.fit(loader)
    x, y = train.tensors
    # Parametrise the MLP by the blocks' [W | b] layouts (side="in"), so autograd's Hessian comes
    # out in the engine's coordinates without any reindexing.
    layouts = tuple(b.layout(*(p.detach() for p in b.parameters())) for b in engine.blocks)

    def mean_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(x @ first[:, :-1].T + first[:, -1])
        return F.cross_entropy(hidden @ second[:, :-1].T + second[:, -1], y)

    full = torch.autograd.functional.hessian(mean_loss, layouts)
    sizes = [t.numel() for t in layouts]
    expected = torch.cat([torch.cat([full[i][j].reshape(sizes[i], sizes[j]) for j in range(2)], 1) for i in range(2)])
    torch.testing.assert_close(engine.fitted.hessian, expected, rtol=1e-10, atol=1e-14)  # measured 9e-13 / 8e-17


@pytest.mark.parametrize("method", ["hyperinf", "datainf", "lissa", "exact-fim"])
def test_scores_do_not_depend_on_batch_size(problem, method):
    model, train, val = problem
    results = []
    for batch_size in (1, 7, 32):
        loader = DataLoader(train, batch_size=batch_size)
        engine = engine_for(model, method)
        results.append(engine.fit(loader).score(loader, DataLoader(val, batch_size=batch_size)))
    # float64, summed in another order: measured 3e-13 relative, 9e-15 absolute
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[2], results[0], rtol=1e-10, atol=1e-12)


def test_self_influence_and_pairwise_match_definition(problem):
    model, train, val = problem
    engine = engine_for(model, "exact")
    loader = DataLoader(train, batch_size=8)
    engine.fit(loader)
    g = loop_gradients(model, engine, train)
    q = loop_gradients(model, engine, val)
    expected_self = torch.zeros(N_TRAIN, dtype=torch.float64)
    expected_pair = torch.zeros(N_TRAIN, N_VAL, dtype=torch.float64)
    for b in engine.blocks:
        gb = g[b.name]
        lam = 0.1 * gb.square().sum() / (N_TRAIN * b.num_params)
        a = torch.einsum("nrd,nre->de", gb, gb) / N_TRAIN + lam * torch.eye(gb.shape[2], dtype=gb.dtype)
        a_inv = torch.linalg.inv(a)
        expected_self -= torch.einsum("nrd,de,nre->n", gb, a_inv, gb)
        expected_pair -= torch.einsum("nrd,de,mre->nm", gb, a_inv, q[b.name])
    self_scores = engine.self_influence(loader)
    assert (self_scores <= 0).all()
    torch.testing.assert_close(self_scores, expected_self, rtol=1e-13, atol=1e-12)  # measured 7e-16 / 2e-14
    pair = engine.pairwise(loader, DataLoader(val, batch_size=5), query_chunk=4)
    torch.testing.assert_close(pair, expected_pair, rtol=1e-10, atol=1e-12)  # measured 3e-12 (small entries) / 1e-14
    # The mean over query columns is the validation score.
    # measured 3e-14 / 8e-16
    torch.testing.assert_close(pair.mean(1), engine.score(loader, DataLoader(val)), rtol=1e-11, atol=1e-13)


def test_lissa_equals_its_closed_form_along_each_eigen_direction(problem):
    """``J`` terms of the series give ``(1 - (1 - mu/s)^J) / mu`` per eigenvalue ``mu`` of the damped GFIM."""
    model, train, val = problem
    loader = DataLoader(train, batch_size=8)
    probe = engine_for(model, "exact").fit(loader)
    g = loop_gradients(model, probe, train)
    v = {name: t.mean(0) for name, t in loop_gradients(model, probe, val).items()}
    damped = {}
    for b in probe.blocks:
        lam = 0.1 * g[b.name].square().sum() / (N_TRAIN * b.num_params)
        damped[b.name] = torch.einsum("nrd,nre->de", g[b.name], g[b.name]) / N_TRAIN + lam * torch.eye(
            b.shape[1], dtype=torch.float64
        )
    scale = 1.5 * max(float(torch.linalg.eigvalsh(a)[-1]) for a in damped.values())
    for iterations in (10, 3):
        expected, residual = torch.zeros(N_TRAIN, dtype=torch.float64), {}
        for name, a in damped.items():
            mu, q = torch.linalg.eigh(a)
            h = v[name] @ q @ torch.diag((1 - (1 - mu / scale) ** iterations) / mu) @ q.T
            expected -= torch.einsum("nrd,rd->n", g[name], h)
            residual[name] = float(((v[name] - h @ a).norm(dim=1) / v[name].norm(dim=1)).max())
        engine = engine_for(model, "lissa", lissa_iters=iterations, lissa_scale=scale).fit(loader)
        with pytest.warns(
            NotConvergedWarning, match=f"lissa stopped after {iterations} iterations far from the inverse"
        ):
            scores = engine.score(loader, DataLoader(val, batch_size=5))
        torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-13 * float(expected.abs().max()))
        # Its diagnostics report the residual of the validation direction, ||v - A h|| / ||v||, per block.
        reported = {d.block: d.residual for d in engine.diagnostics()}
        assert reported == pytest.approx(residual, rel=1e-8)
        assert max(residual.values()) > 0.5  # far from the inverse: the warning above is earned


def test_lissa_refuses_a_scale_that_diverges(problem):
    model, train, val = problem
    loader = DataLoader(train, batch_size=8)
    with pytest.raises(ValueError, match="lissa_scale must be positive"):
        engine_for(model, "lissa", lissa_scale=0.0)
    engine = engine_for(model, "lissa", lissa_scale=1e-6).fit(loader)
    with pytest.raises(ConfigurationError, match=r"lissa_scale=1e-06 makes LiSSA diverge on block .*lambda_max / 2"):
        engine.score(loader, DataLoader(val))


def test_invalid_options_are_refused_at_construction(problem):
    model, _, _ = problem
    with pytest.raises(ConfigurationError, match="damping=0 is undefined"):
        engine_for(model, "datainf", damping=0.0)
    with pytest.raises(ValueError, match="schulz_init must be 'auto' or a positive float"):
        engine_for(model, "hyperinf", schulz_init=-1.0)
    with pytest.raises(ValueError, match="schulz_init"):
        engine_for(model, "hyperinf", schulz_init="paper")
    with pytest.raises(ValueError, match="schulz_order must be >= 2"):
        engine_for(model, "hyperinf", schulz_order=1)  # before pass 1, not when the inverse is built


def test_gfim_and_fim_share_lambda_but_the_gfim_eigenvalues_are_r_times_larger(problem):
    """The README's damping note: the same lambda_l damps HyperINF r times less than exact-fim / DataInf."""
    model, train, val = problem
    loader = DataLoader(train, batch_size=8)
    engine = engine_for(model, "hyperinf").fit(loader, methods=["exact-fim"])
    engine.score_methods(loader, DataLoader(val), ["hyperinf", "exact-fim"])
    by_method = {(d.method, d.block): d.damping for d in engine.diagnostics()}
    spectrum = {row["block"]: row for row in engine.spectrum()}
    for b in engine.blocks:
        assert by_method[("hyperinf", b.name)] == by_method[("exact-fim", b.name)]
        fim_mean = float(torch.linalg.eigvalsh(engine.fitted.curvature.flat_fim(b.name)).mean())
        assert spectrum[b.name]["eig_mean"] == pytest.approx(b.shape[0] * fim_mean, rel=1e-10)
        assert by_method[("hyperinf", b.name)] == pytest.approx(0.1 * fim_mean, rel=1e-10)


def test_an_indefinite_hessian_is_named_with_its_most_negative_eigenvalue(problem):
    """A tanh MLP's Hessian is indefinite: the error says so (and what to use), not 'add damping' alone."""
    model, train, val = problem
    loader = DataLoader(train, batch_size=16)
    engine = engine_for(model, "exact-hessian", damping=1e-6, damping_mode="absolute").fit(loader)
    lowest = float(torch.linalg.eigvalsh(engine.fitted.hessian)[0]) + 1e-6
    assert lowest < 0  # the premise: this network's loss is not convex in its weights
    with pytest.raises(
        NotSPDError, match=rf"indefinite \(most negative eigenvalue {lowest:.4g}\).*'exact-ggn'.*'exact', 'hyperinf'"
    ):
        engine.score(loader, DataLoader(val))
