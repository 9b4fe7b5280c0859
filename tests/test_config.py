"""The engine's options, split by what they shape: routing of the flat options, checks at construction, supports()."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperinf import ConfigurationError, HyperinfError, InfluenceConfig, InfluenceEngine
from hyperinf.config import FitConfig, option_names


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_flat_options_reach_their_part():
    config = InfluenceConfig.from_options(
        damping=0.3, schulz_max_iter=7, on_nonconvergence="raise", lissa_iters=4, dtype="float64", spill=False
    )
    assert config.score.damping == 0.3 and config.fit.dtype == "float64" and config.runtime.spill is False
    assert config.schulz.max_iter == 7 and config.schulz.on_nonconvergence == "raise" and config.lissa.iters == 4
    assert InfluenceConfig.from_options() == InfluenceConfig()


def test_every_field_of_every_part_has_one_option_name():
    names = option_names()
    parts = {f.name: f.default_factory for f in fields(InfluenceConfig)}
    assert len(names) == sum(len(fields(kind)) for kind in parts.values())  # type: ignore[arg-type]


def test_an_unknown_option_is_named_with_the_choices():
    with pytest.raises(TypeError, match=r"unknown option\(s\) schulz_iters; the options are: .*schulz_max_iter"):
        InfluenceEngine(nn.Linear(3, 2), loss_fn, blocks="linear", schulz_iters=5)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"damping": -1.0}, r"damping must be >= 0, got -1.0: pass 0 \(undamped\) or a positive factor"),
        ({"damping_mode": "mean"}, "damping_mode must be one of .*, got 'mean': pick one of them"),
        ({"dtype": "float16"}, "dtype must be one of .*, got 'float16': pick one of them"),
        ({"schulz_max_iter": -1}, "schulz_max_iter must be >= 0, got -1: pass an iteration cap"),
        ({"schulz_order": 1}, "schulz_order must be >= 2, got 1: pass 2"),
        ({"schulz_init": 0.0}, "schulz_init must be 'auto' or a positive float .*: pass 'auto'"),
        ({"on_nonconvergence": "ignore"}, "on_nonconvergence must be one of"),
        ({"lissa_iters": 0}, "lissa_iters must be >= 1, got 0: pass the number of Neumann terms"),
        ({"lissa_scale": 0.0}, "lissa_scale must be positive, got 0.0: pass a scale above lambda_max / 2"),
        ({"side": "left"}, "side must be one of"),
        ({"pass2": "auto"}, "pass2 must be one of"),
    ],
)
def test_options_are_checked_when_the_engine_is_built(option, message):
    """Every bad value is a ConfigurationError (a HyperinfError: one line on the command line; still a ValueError),
    naming the value and the fix."""
    with pytest.raises(ConfigurationError, match=message) as raised:
        InfluenceEngine(nn.Linear(3, 2), loss_fn, blocks="linear", **option)
    assert isinstance(raised.value, HyperinfError) and isinstance(raised.value, ValueError)
    assert "\n" not in str(raised.value)


class Untouchable:
    """A loader that fails if any batch is read: the checks must come first."""

    def __iter__(self):
        raise AssertionError("data was read before the method was checked")

    def __len__(self):
        return 1


def test_supports_names_why_a_method_cannot_run_before_any_data_is_read():
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    engine = InfluenceEngine(model, loss_fn, blocks="linear", fim_max_params=40, hessian_max_params=40)
    assert engine.supports("hyperinf") and engine.supports("kfac")
    assert not engine.supports("exact-fim")  # block 0 has 6 x 9 = 54 parameters > 40
    assert "fim_max_params=40" in engine.unsupported_reason("exact-fim")
    assert engine.unsupported_reason("hyperinf") is None
    with pytest.raises(ConfigurationError, match=r"flattened FIM of block '0' would be 54 x 54 .*fim_max_params=40"):
        engine.fit(Untouchable(), methods=["exact-fim"])
    with pytest.raises(ConfigurationError, match="exact Hessian of the selected blocks has 75 rows"):
        engine.fit(Untouchable(), methods=["exact-hessian"])
    plain = InfluenceEngine(model, loss_fn, blocks="linear")
    assert not plain.supports("exact-ggn") and plain.supports("exact-hessian")  # no output functions given
    with pytest.raises(ConfigurationError, match="needs the model's outputs and the loss of them"):
        plain.check_supports("exact-ggn")
    undamped = InfluenceEngine(model, loss_fn, blocks="linear", damping=0.0)
    assert not undamped.supports("datainf") and undamped.supports("exact")


def test_a_saved_fit_records_every_field_that_shapes_it(tmp_path):
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))]
    engine = InfluenceEngine(model, loss_fn, blocks="linear", dtype="float64", progress=False).fit(data)
    meta = json.loads((engine.save_fit(tmp_path / "fit") / "fit.json").read_text())
    assert meta["fit"] == {"side": "in", "include_bias": True, "dtype": "float64"}
    assert set(meta["fit"]) == {f.name for f in fields(FitConfig)}
