"""The gradient index (:mod:`hyperinf.index`) against explicit solves: whole, it gives the exact pairwise scores;
projected, the exact influence of the projected model (the gradients projected, their GFIM solved by Cholesky).
Builds resume; other weights and settings are refused.

The model, data and references are test_pairwise's: looped single-example gradients and explicit solves.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import (
    bert_loss,
    mlp,
    mlp_batch,
    mlp_loss,
    random_padded_batch,
    reference_gradients,
    reference_kronecker,
    split_examples,
    tiny_bert,
    tiny_bert_lora,
)
from test_conv import CONVS, SmallCNN, images
from test_conv import loss_fn as conv_loss
from test_pairwise import DAMPING, N_QUERY, N_TRAIN, assert_agree, loss_fn, query_loader, reference_pairwise
from test_pairwise import setup as pairwise_setup

import hyperinf.index
from hyperinf import CheckpointMismatchError, ConfigurationError, FitMismatchError, InfluenceEngine
from hyperinf.gradients import PerSampleGradients
from hyperinf.index import GradientIndex, Projection, needs_kronecker, plan_layout
from hyperinf.metrics import spearman

# method -> its reference in test_pairwise
WHOLE = {"hyperinf": "exact", "exact": "exact", "tracin": "tracin", "kfac": "kfac", "ekfac": "ekfac"}


def build(tmp_path, name="index", **options):
    engine, _, _, loader = pairwise_setup()
    return GradientIndex.build(engine, loader, tmp_path / name, **options)


def looped(queries: bool = False) -> dict[str, torch.Tensor]:
    """Per-block gradients of the training or query examples from single-example backward calls."""
    engine, train, query, _ = pairwise_setup()
    examples = split_examples((query if queries else train).tensors)
    return reference_gradients(engine.model, loss_fn, examples, engine.blocks)


@pytest.mark.parametrize("method", list(WHOLE))
def test_a_whole_index_gives_the_exact_pairwise_scores(tmp_path, method):
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=0, storage="float32", chunk_batches=2, kronecker=needs_kronecker(method))
    assert len(index) == N_TRAIN and index.projection.dim == sum(b.num_params for b in engine.blocks)
    scores = index.pairwise(engine, query_loader(), method=method)
    assert scores.shape == (N_TRAIN, N_QUERY)
    assert_agree(scores.double(), reference_pairwise(WHOLE[method]), 1e-6)


def test_an_unfitted_engine_builds_and_queries_an_index(tmp_path):
    engine = pairwise_setup()[0]
    fresh = InfluenceEngine(engine.model, loss_fn, blocks="linear", damping=DAMPING, dtype="float64", progress=False)
    index = GradientIndex.build(fresh, pairwise_setup()[3], tmp_path / "index", dim=0, storage="float32")
    assert_agree(index.pairwise(fresh, query_loader(), method="exact").double(), reference_pairwise("exact"), 1e-6)


def test_a_projected_index_gives_the_exact_influence_of_the_projected_model(tmp_path):
    """Reference: the looped gradients projected, the damped GFIM of the projected blocks solved by Cholesky."""
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=12, seed=5, storage="float32")
    g, q = index.projection.blocks(looped()), index.projection.blocks(looped(queries=True))
    expected = torch.zeros(N_TRAIN, N_QUERY, dtype=torch.float64)
    for name, gb in g.items():
        n, r, d = gb.shape
        damping = DAMPING * gb.square().sum() / (n * r * d)
        a = torch.einsum("nrd,nre->de", gb, gb) / n + damping * torch.eye(d, dtype=gb.dtype)
        h = torch.linalg.solve(a, q[name].transpose(1, 2)).transpose(1, 2)
        expected -= gb.reshape(n, -1) @ h.reshape(N_QUERY, -1).T
    for method in ("exact", "hyperinf"):
        assert_agree(index.pairwise(engine, query_loader(), method=method).double(), expected, 1e-5)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_a_projected_index_gives_the_kronecker_influence_of_the_projected_model(tmp_path, method, side):
    """Reference: the looped token factors projected, ``R S R^T (x) D A D^T`` in the layout's order (side "out":
    the inputs' factor on the rows; EK-FAC: its eigenbases with the eigenvalues refit on the projected gradients)
    written out as an explicit ``k_r k_d`` square matrix and solved."""
    fitted, train, queries, loader = pairwise_setup()
    engine = InfluenceEngine(
        fitted.model, loss_fn, blocks="linear", side=side, damping=DAMPING, dtype="float64", progress=False
    )
    index = GradientIndex.build(engine, loader, tmp_path / "index", dim=12, seed=5, storage="float32", kronecker=True)
    sums = reference_kronecker(engine.model, loss_fn, split_examples(train.tensors), engine.blocks)
    g = index.projection.blocks(
        reference_gradients(engine.model, loss_fn, split_examples(train.tensors), engine.blocks)
    )
    q = index.projection.blocks(
        reference_gradients(engine.model, loss_fn, split_examples(queries.tensors), engine.blocks)
    )
    expected = torch.zeros(N_TRAIN, N_QUERY, dtype=torch.float64)
    for block in engine.blocks:
        gb, qb = g[block.name], q[block.name]
        n, k_r, k_d = gb.shape
        left, right = (
            m if m is not None else torch.eye(size)
            for m, size in zip(index.projection.factors[block.name], block.shape)
        )
        outputs, inputs = sums[block.name]["outputs"] / n, sums[block.name]["inputs"] / sums[block.name]["tokens"]
        rows, columns = (outputs, inputs) if side == "in" else (inputs, outputs)
        s, a = left @ rows @ left.T, right @ columns @ right.T
        curvature = torch.kron(s, a)
        if method == "ekfac":
            (_, q_r), (_, q_d) = torch.linalg.eigh(s), torch.linalg.eigh(a)
            basis = torch.kron(q_r, q_d)
            curvature = basis @ torch.diag((q_r.T @ gb @ q_d).square().mean(0).reshape(-1)) @ basis.T
        damping = DAMPING * gb.square().sum() / (n * k_r * k_d)
        h = torch.linalg.solve(curvature + damping * torch.eye(k_r * k_d, dtype=gb.dtype), qb.reshape(N_QUERY, -1).T)
        expected -= gb.reshape(n, -1) @ h
    assert_agree(index.pairwise(engine, query_loader(), method=method).double(), expected, 1e-6)


def test_the_projection_is_unbiased():
    """``E[<P a, P b>] = <a, b>`` for the Kronecker-structured Gaussian projection, over 4000 seeds."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 5, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    layout = [hyperinf.index.BlockLayout("w", 5, 6, 2, 3)]
    products = torch.tensor(
        [
            float((p.flat(p.blocks({"w": a})) * p.flat(p.blocks({"w": b}))).sum())
            for p in (Projection(layout, seed) for seed in range(4000))
        ]
    )
    exact = float((a * b).sum())
    standard_error = float(products.std()) / 4000**0.5
    assert abs(float(products.mean()) - exact) < 4 * standard_error, (float(products.mean()), exact)
    assert float(products.std()) > 0.1 * abs(exact)  # one draw is far from exact: the mean is what agrees


def test_agreement_with_the_exact_scores_grows_with_the_dimension(tmp_path):
    engine = pairwise_setup()[0]
    exact = reference_pairwise("exact")
    agreement = {}
    for dim in (6, 12, 24, 0):
        rho = [
            spearman(
                build(tmp_path, f"d{dim}s{seed}", dim=dim, seed=seed, storage="float32")
                .pairwise(engine, query_loader(), method="exact")
                .double()
                .T,
                exact.T,
            ).mean()
            for seed in range(20)
        ]
        agreement[dim] = float(torch.stack(rho).mean())
    assert agreement[6] < agreement[12] < agreement[24] < agreement[0], agreement
    assert agreement[0] > 0.999 and agreement[6] < 0.9, agreement


def test_top_k_from_the_index_is_the_reference_ranking(tmp_path):
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=0, storage="float32", row_ids=range(100, 100 + N_TRAIN))
    top = index.top_k(engine, query_loader(), k=3, method="exact")
    reference = reference_pairwise("exact")
    assert torch.equal(top.helpful, reference.topk(3, dim=0, largest=False).indices.T)
    assert torch.equal(top.harmful, reference.topk(3, dim=0).indices.T)
    assert torch.equal(index.ids[top.helpful], top.helpful + 100)


def test_the_cosine_option_scores_minus_the_cosine(tmp_path):
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=0, storage="float32")
    cosine = index.pairwise(engine, query_loader(), method="tracin", normalize=True)
    flat_g = torch.cat([t.reshape(N_TRAIN, -1) for t in looped().values()], 1)
    flat_q = torch.cat([t.reshape(N_QUERY, -1) for t in looped(queries=True).values()], 1)
    expected = -torch.nn.functional.normalize(flat_g, dim=1) @ torch.nn.functional.normalize(flat_q, dim=1).T
    assert_agree(cosine.double(), expected, 1e-6)


def test_the_projection_seed_fixes_the_index_and_is_recorded(tmp_path):
    a = build(tmp_path, "a", dim=12, seed=3)
    b = build(tmp_path, "b", dim=12, seed=3)
    c = build(tmp_path, "c", dim=12, seed=4)
    assert torch.equal(a.rows, b.rows) and not torch.equal(a.rows, c.rows)
    assert a.meta["seed"] == 3 and a.meta["dim"] == 12


class Narrow:
    """A block-shaped stand-in: a 1000 x 4 gradient layout."""

    name, shape = "narrow", (1000, 4)


def test_the_layout_splits_the_dimension_over_blocks_by_size():
    engine = pairwise_setup()[0]
    whole = plan_layout(engine.blocks, 0)
    assert [(x.k_r, x.k_d) for x in whole] == [b.shape for b in engine.blocks]  # [5 x 5], [3 x 6]
    small = plan_layout(engine.blocks, 12)  # shares 25/43 and 18/43 of 12: 7 and 5
    assert [(x.k_r, x.k_d) for x in small] == [(2, 3), (2, 2)]
    narrow = hyperinf.index.plan_layout([Narrow()], 400)  # r = 1000, d = 4: the rows take what d cannot
    assert [(x.k_r, x.k_d) for x in narrow] == [(100, 4)]
    with pytest.raises(ValueError, match="dim must be >= 0"):
        plan_layout(engine.blocks, -1)


def test_stored_float16_rows_keep_scores_to_float16_precision(tmp_path):
    engine = pairwise_setup()[0]
    index = build(tmp_path, dim=0)  # the default storage
    assert index.meta["storage"] == "float16"
    scores = index.pairwise(engine, query_loader(), method="exact").double()
    assert_agree(scores, reference_pairwise("exact"), 2e-2)


@pytest.mark.parametrize("way", ["replayed", "from-factors", "kronecker"])
def test_a_killed_build_resumes_after_its_last_whole_chunk(tmp_path, monkeypatch, way):
    """Every way to the gradients: the fit's kept ones replayed, projected factors computed anew, and those with
    the projected token factors summed (which resume from their sums saved after the last whole chunk)."""
    engine, kronecker = pairwise_setup()[0], way == "kronecker"
    if way != "replayed":
        engine = InfluenceEngine(engine.model, loss_fn, blocks="linear", dtype="float64", progress=False)

    def build(tmp_path, name="index", **options):
        return GradientIndex.build(engine, pairwise_setup()[3], tmp_path / name, kronecker=kronecker, **options)

    written = []
    write = hyperinf.index._write_chunk

    def dying(directory, index, *rest):
        if index == 2:
            raise KeyboardInterrupt
        written.append(index)
        return write(directory, index, *rest)

    monkeypatch.setattr(hyperinf.index, "_write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, dim=12, chunk_batches=1)
    with pytest.raises(FitMismatchError, match="not complete"):
        GradientIndex.open(tmp_path / "index")
    monkeypatch.setattr(hyperinf.index, "_write_chunk", lambda *a: (written.append(a[1]), write(*a))[1])
    resumed = build(tmp_path, dim=12, chunk_batches=1)
    assert written == [0, 1, 2]  # the resumed build wrote only the missing chunk
    whole = build(tmp_path, "fresh", dim=12, chunk_batches=1)
    assert torch.equal(resumed.rows, whole.rows) and torch.equal(resumed.ids, torch.arange(N_TRAIN))
    assert all(torch.equal(x, y) for x, y in zip(resumed.curvature.tensors(), whole.curvature.tensors()))
    if kronecker:
        assert resumed.kronecker is not None and whole.kronecker is not None
        assert resumed.kronecker.count == whole.kronecker.count == N_TRAIN
        assert all(torch.allclose(x, y) for x, y in zip(resumed.kronecker.tensors(), whole.kronecker.tensors()))


def test_a_build_killed_between_a_chunk_and_its_factors_rewrites_that_chunk(tmp_path, monkeypatch):
    """The factors' sums are saved after each chunk; a kill in between leaves them one chunk behind, and the resumed
    build rewrites that chunk rather than miss its factors."""
    saves = []
    write = hyperinf.index.atomic_write

    def dying(path, save):
        if path.name == "kronecker.safetensors":
            if len(saves) == 2:
                raise KeyboardInterrupt
            saves.append(path)
        return write(path, save)

    monkeypatch.setattr(hyperinf.index, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, dim=12, chunk_batches=1, kronecker=True)
    assert (tmp_path / "index" / "chunk-000002.safetensors").is_file()  # written, its factors not
    monkeypatch.setattr(hyperinf.index, "atomic_write", write)
    resumed = build(tmp_path, dim=12, chunk_batches=1, kronecker=True)
    whole = build(tmp_path, "fresh", dim=12, chunk_batches=1, kronecker=True)
    assert resumed.kronecker is not None and whole.kronecker is not None
    assert resumed.kronecker.count == N_TRAIN and torch.equal(resumed.ids, whole.ids)
    assert all(torch.allclose(x, y) for x, y in zip(resumed.kronecker.tensors(), whole.kronecker.tensors()))


def test_an_index_missing_its_factors_or_from_before_them_is_handled(tmp_path):
    """Factors deleted (or not copied with the index): refused, not read as zero. An index.json written before
    indexes had factors opens and resumes as one without them."""
    build(tmp_path, dim=12, kronecker=True)
    (tmp_path / "index" / "kronecker.safetensors").unlink()
    with pytest.raises(FitMismatchError, match="Kronecker factors in .* are missing or do not cover every row"):
        GradientIndex.open(tmp_path / "index")
    build(tmp_path, "old", dim=12)
    meta_path = tmp_path / "old" / "index.json"
    meta = json.loads(meta_path.read_text())
    del meta["kronecker"]
    meta_path.write_text(json.dumps(meta))
    assert GradientIndex.open(tmp_path / "old").kronecker is None
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "old").glob("chunk-*")}
    build(tmp_path, "old", dim=12)  # the same settings: nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "old").glob("chunk-*")} == stamps


def test_a_folder_built_with_other_settings_or_rows_is_refused(tmp_path):
    build(tmp_path, dim=12, source="rows-a")
    with pytest.raises(CheckpointMismatchError, match=r"other settings \(dim, layouts differ\)"):
        build(tmp_path, dim=6, source="rows-a")
    with pytest.raises(CheckpointMismatchError, match=r"other settings \(source differ\)"):
        build(tmp_path, dim=12, source="rows-b")


def test_querying_with_other_weights_is_refused(tmp_path):
    index = build(tmp_path, dim=12)
    engine = pairwise_setup()[0]
    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    other = InfluenceEngine(model, loss_fn, blocks="linear", damping=DAMPING, dtype="float64", progress=False)
    with pytest.raises(
        FitMismatchError, match=r"weights of block '0' differ from those the index in .* build it again"
    ):
        index.pairwise(other, query_loader())


@pytest.mark.parametrize("method", ["datainf", "exact-fim"])
def test_methods_beyond_the_projected_gfim_and_factors_are_refused(tmp_path, method):
    index = build(tmp_path, dim=12)
    with pytest.raises(ConfigurationError, match=f"method '{method}' cannot precondition in an index"):
        index.pairwise(pairwise_setup()[0], query_loader(), method=method)


def test_kronecker_methods_on_an_index_built_without_the_factors_are_refused(tmp_path):
    index = build(tmp_path, dim=12)
    with pytest.raises(
        FitMismatchError, match=r"'ekfac' needs the projected layers' Kronecker factors.*--method ekfac"
    ):
        index.pairwise(pairwise_setup()[0], query_loader(), method="ekfac")


def projected_both_ways(engine: InfluenceEngine, loader, dim: int) -> tuple[list, list]:
    """The engine's projected per-example gradients from the factors, and its whole gradients then projected."""
    projection = Projection(plan_layout(engine.blocks, dim), seed=1)
    factored = list(engine.per_example_gradients(loader, project=projection.factors))
    whole = [projection.blocks(g) for g in engine.per_example_gradients(loader)]
    return factored, whole


@pytest.mark.parametrize("side", ["in", "out"])
def test_gradients_projected_from_their_factors_equal_the_projected_gradients_of_dense_layers(side):
    """Biases (a 1 appended to the inputs) and either layout side; no fit, so the factors are used."""
    model = mlp(dtype=torch.float64)
    engine = InfluenceEngine(model, mlp_loss, blocks="linear", side=side, dtype="float64", progress=False)
    loader = [mlp_batch(5, seed=s, dtype=torch.float64) for s in range(2)]
    factored, whole = projected_both_ways(engine, loader, dim=30)
    for mine, theirs in zip(factored, whole):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert mine[name].shape == theirs[name].shape
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-10, atol=1e-12)


def test_gradients_projected_from_their_factors_equal_the_projected_gradients_of_padded_lora_and_convolutions():
    """LoRA on a padded batch (lora_B laid out transposed; padding masked) and convolutions (input patches)."""
    pytest.importorskip("peft")
    bert = tiny_bert_lora(r=8).double()
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if "lora_B" in name:  # a trained adapter: every block has gradient
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    engine = InfluenceEngine(bert, bert_loss, blocks="lora", dtype="float64", progress=False)
    assert all(x.k_r < x.r for x in plan_layout(engine.blocks, 40))  # both sides of every block projected
    factored, whole = projected_both_ways(engine, [random_padded_batch(4, seed=3)], dim=40)
    for name in whole[0]:
        torch.testing.assert_close(factored[0][name], whole[0][name], rtol=1e-9, atol=1e-12)
    engine = InfluenceEngine(SmallCNN().double(), conv_loss, blocks=[*CONVS, "head"], dtype="float64", progress=False)
    factored, whole = projected_both_ways(engine, [images(3, seed=0)], dim=20)
    for name in whole[0]:
        torch.testing.assert_close(factored[0][name], whole[0][name], rtol=1e-9, atol=1e-12)


def test_projected_token_factors_are_the_projected_kronecker_factors_of_padded_lora_and_convolutions():
    """An index built for K-FAC sums ``R S R^T`` and ``D A D^T`` per block: the unprojected token factors (padding
    left out), in layout order, projected on each side. Dense BERT layers have biases on padded tokens, and a head
    on a pooled vector (no token axis)."""
    pytest.importorskip("peft")
    bert = tiny_bert_lora(r=8).double()
    cnn = SmallCNN().double()
    cases = [
        (bert, bert_loss, "lora", random_padded_batch(4, seed=3), 40),
        (tiny_bert(dtype=torch.float64), bert_loss, "linear", random_padded_batch(4, seed=3), 2000),
        (cnn, conv_loss, [*CONVS, "head"], images(3, seed=0), 20),
    ]
    for model, loss, blocks, batch, dim in cases:
        engine = InfluenceEngine(model, loss, blocks=blocks, dtype="float64", progress=False)
        projection = Projection(plan_layout(engine.blocks, dim), seed=1)
        (projected,) = engine.projected_gradients([batch], projection.factors, kronecker=True)
        whole = PerSampleGradients(model, loss, engine.blocks, dtype=torch.float64, kronecker=True)(batch)
        assert projected.factors is not None and whole.factors is not None
        for block in engine.blocks:
            mine, theirs = projected.factors[block.name], whole.factors[block.name]
            rows, columns = block.kronecker_order(theirs.inputs, theirs.outputs)
            left, right = (
                m if m is not None else torch.eye(n, dtype=torch.float64)
                for m, n in zip(projection.factors[block.name], block.shape)
            )
            torch.testing.assert_close(mine.outputs, left @ rows @ left.T, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(mine.inputs, right @ columns @ right.T, rtol=1e-9, atol=1e-12)
            assert mine.tokens == theirs.tokens
