"""Fit once, query many times: a saved fit scores like the engine that computed it, and refuses other models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine
from hyperinf.errors import FitMismatchError, NotFittedError

METHODS = [
    "hyperinf",
    "exact",
    "exact-fim",
    "hyperinf-fim",
    "exact-hessian",
    "exact-ggn",
    "lissa",
    "tracin",
    "datainf",
    "kfac",
    "ekfac",
]
TRAIN_PASS_AT_BUILD = ("datainf", "ekfac")  # a loaded fit recomputes the training gradients for these


def logits(model, batch):
    return model(batch[0])


def output_loss(outputs, batch):
    return F.cross_entropy(outputs, batch[1], reduction="none")


def loss_fn(model, batch):
    return output_loss(logits(model, batch), batch)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    return DataLoader(TensorDataset(x[:30], y[:30]), batch_size=8), DataLoader(
        TensorDataset(x[30:], y[30:]), batch_size=4
    )


def engine_of(model, **options):
    # Damping enough to make the tanh MLP's Hessian PD; the output functions for the exact GGN's fit.
    options = {"damping": 0.5, "damping_mode": "absolute", "output_fn": logits, "output_loss": output_loss, **options}
    return InfluenceEngine(model, loss_fn, blocks="linear", dtype="float64", progress=False, **options)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data):
    train, val = data
    engine = engine_of(make_model()).fit(train, methods=METHODS)
    expected = engine.score_methods(train, val, METHODS)
    folder = engine.save_fit(tmp_path_factory.mktemp("fit") / "fit")
    return folder, expected, engine


@pytest.mark.parametrize("method", METHODS)
def test_a_loaded_fit_scores_without_pass_one(saved, data, method):
    folder, expected, _ = saved
    train, val = data
    calls = []

    def counting_loss(model, batch):
        calls.append(len(batch[1]))
        return loss_fn(model, batch)

    engine = InfluenceEngine(
        make_model(),
        counting_loss,
        blocks="linear",
        method=method,
        dtype="float64",
        progress=False,
        damping=0.5,
        damping_mode="absolute",
    )
    engine.load_fit(folder, train_loader=train)
    scores = engine.score(train, val)
    torch.testing.assert_close(scores, expected[method], rtol=1e-12, atol=1e-15)
    # One validation pass and one training pass (DataInf, EK-FAC: one more over the fit's training data); no curvature pass.
    assert sum(calls) == 10 + 30 * (2 if method in TRAIN_PASS_AT_BUILD else 1)


def test_a_loaded_fit_can_be_damped_again(saved, data):
    folder, _, _ = saved
    train, val = data
    fresh = engine_of(make_model(), method="exact", damping=1.0).fit(train)
    loaded = engine_of(make_model(), method="exact", damping=1.0).load_fit(folder)
    torch.testing.assert_close(loaded.score(train, val), fresh.score(train, val), rtol=1e-12, atol=1e-15)


def test_the_saved_folder_names_blocks_weights_and_count(saved):
    folder, _, engine = saved
    meta = json.loads((folder / "fit.json").read_text())
    assert meta["count"] == 30 and meta["fim"] and meta["hessian"] and meta["ggn"] and meta["kronecker"]
    assert [b["name"] for b in meta["blocks"]] == [b.name for b in engine.blocks]
    assert all(len(b["weights"]) == 64 for b in meta["blocks"])


def test_other_weights_blocks_or_options_are_refused(saved):
    folder, _, _ = saved
    with pytest.raises(FitMismatchError, match=r"weights of block '0' differ"):
        engine_of(make_model(seed=1)).load_fit(folder)
    with pytest.raises(FitMismatchError, match=r"other blocks than this engine: missing here \['0'\]"):
        InfluenceEngine(make_model(), loss_fn, blocks=["2"], dtype="float64", progress=False).load_fit(folder)
    with pytest.raises(FitMismatchError, match=r"side='in' \(this engine: 'out'\)"):
        engine_of(make_model(), side="out").load_fit(folder)
    with pytest.raises(FitMismatchError, match=r"dtype='float64' \(this engine: 'float32'\)"):
        InfluenceEngine(make_model(), loss_fn, blocks="linear", progress=False).load_fit(folder)


def test_a_fit_without_what_the_method_needs_is_refused(tmp_path, data, saved):
    train, _ = data
    folder = engine_of(make_model()).fit(train).save_fit(tmp_path / "plain")
    with pytest.raises(
        NotFittedError, match=r"needs the flattened FIM: call fit\(train_loader, methods=\['exact-fim'\]\)"
    ):
        engine_of(make_model(), method="exact-fim").load_fit(folder)
    with pytest.raises(
        NotFittedError, match=r"needs the Kronecker factors: call fit\(train_loader, methods=\['kfac'\]\)"
    ):
        engine_of(make_model(), method="kfac").load_fit(folder)
    with pytest.raises(NotFittedError, match=r"needs the exact GGN: call fit\(train_loader, methods=\['exact-ggn'\]\)"):
        engine_of(make_model(), method="exact-ggn").load_fit(folder)
    for method in TRAIN_PASS_AT_BUILD:  # a fit with every sum, loaded without its training data
        with pytest.raises(
            NotFittedError, match=f"method '{method}' sums over the training gradients.*pass train_loader= to load_fit"
        ):
            engine_of(make_model(), method=method).load_fit(saved[0]).score(train, train)


def test_an_unfinished_or_missing_save_is_refused(tmp_path, data):
    train, _ = data
    folder = engine_of(make_model()).fit(train).save_fit(tmp_path / "fit")
    (folder / "fit.json").unlink()  # what a save killed before its last file leaves
    with pytest.raises(FitMismatchError, match="holds no saved fit"):
        engine_of(make_model()).load_fit(folder)
    with pytest.raises(FitMismatchError, match="holds no saved fit"):
        engine_of(make_model()).load_fit(tmp_path / "nowhere")
    with pytest.raises(NotFittedError, match="call fit"):
        engine_of(make_model()).save_fit(tmp_path / "unfitted")


def test_a_fit_of_the_first_format_is_refused_with_the_fix(tmp_path, data):
    """Format 1 keyed its options as "layout" and may lack the GFIM flag: read back, it names both formats."""
    train, _ = data
    folder = engine_of(make_model()).fit(train).save_fit(tmp_path / "fit")
    meta = json.loads((folder / "fit.json").read_text())
    meta["format"], meta["layout"] = 1, meta.pop("fit")
    (folder / "fit.json").write_text(json.dumps(meta))
    with pytest.raises(FitMismatchError, match="has format 1; this hyperinf reads format 2"):
        engine_of(make_model()).load_fit(folder)


def test_a_fit_sums_the_gfim_only_for_methods_that_invert_it(saved, data, tmp_path):
    """tracin / K-FAC / EK-FAC / DataInf need no d x d GFIM: without it they score exactly as with it."""
    train, val = data
    lean_methods = ["tracin", "kfac", "ekfac", "datainf"]
    engine = engine_of(make_model(), method="tracin").fit(train, methods=lean_methods)
    assert engine.fitted.curvature.gram is None and engine.fitted.curvature.fim is None
    scores = engine.score_methods(train, val, lean_methods)
    for method in lean_methods:
        torch.testing.assert_close(scores[method], saved[1][method], rtol=1e-12, atol=1e-14)
    with pytest.raises(NotFittedError, match=r"needs the GFIM: call fit\(train_loader, methods=\['hyperinf'\]\)"):
        engine.score(train, val, method="hyperinf")
    with pytest.raises(NotFittedError, match="did not accumulate it"):
        engine.spectrum()
    folder = engine.save_fit(tmp_path / "lean")
    assert json.loads((folder / "fit.json").read_text())["gfim"] is False
    loaded = engine_of(make_model(), method="kfac").load_fit(folder)
    torch.testing.assert_close(loaded.score(train, val), saved[1]["kfac"], rtol=1e-12, atol=1e-14)
    with pytest.raises(NotFittedError, match="needs the GFIM"):
        engine_of(make_model(), method="hyperinf").load_fit(folder)
