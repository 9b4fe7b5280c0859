"""Pass 2 by forward-mode AD: the directional derivative of each example's loss equals -<h, g_k> from gradients."""

from __future__ import annotations

import pytest
import torch
from models import bert_loss, mlp, mlp_loss, random_padded_batch, tiny_bert_lora
from torch.utils.data import DataLoader, TensorDataset

from hyperinf import InfluenceEngine
from hyperinf.errors import ConfigurationError

METHODS = ["hyperinf", "exact", "exact-fim", "datainf", "lissa", "tracin", "kfac", "ekfac"]


def mlp_data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=7)


def both_paths(model, loss_fn, blocks, **options):
    """Two engines on the same model, one per pass-2 path, fitted on the same data."""
    return [
        InfluenceEngine(
            model, loss_fn, blocks=blocks, progress=False, cache_bytes=0, spill=False, pass2=path, **options
        )
        for path in ("jvp", "gradients")
    ]


@pytest.mark.parametrize("side", ["in", "out"])
def test_forward_mode_scores_equal_the_gradient_path_for_every_method(side):
    model = mlp(dtype=torch.float64)
    train, val, queries = mlp_data(30, 1), mlp_data(9, 2), mlp_data(5, 3)
    jvp, grads = both_paths(model, mlp_loss, "linear", dtype="float64", side=side)
    for engine in (jvp, grads):
        engine.fit(train, methods=METHODS)
    for method in METHODS:
        expected = grads.score(train, val, method=method)
        assert grads.pass2_path == "gradients"
        torch.testing.assert_close(jvp.score(train, val, method=method), expected, rtol=1e-11, atol=1e-14)
        assert jvp.pass2_path == "jvp"
    torch.testing.assert_close(jvp.pairwise(train, queries), grads.pairwise(train, queries), rtol=1e-11, atol=1e-14)
    top_jvp, top_grads = jvp.top_k(train, queries, k=3), grads.top_k(train, queries, k=3)
    assert torch.equal(top_jvp.helpful, top_grads.helpful) and torch.equal(top_jvp.harmful, top_grads.harmful)
    losses = jvp.score_methods(train, val, ["exact"]).train_loss
    torch.testing.assert_close(
        losses, torch.cat([mlp_loss(model, batch) for batch in train]).detach(), rtol=1e-14, atol=0
    )


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-5), (torch.float32, 1e-3)])
def test_forward_mode_on_a_peft_lora_bert_with_padding(dtype, tolerance):
    """The issue's bounds: relative error <= 1e-5 in float64, <= 1e-3 in float32, padding included."""
    model = tiny_bert_lora(r=3, dtype=dtype, attn_implementation="sdpa")
    batches = [random_padded_batch(4, max_len=9, min_len=2, seed=s) for s in range(4)]
    train, val = batches[:3], batches[3:]
    jvp, grads = both_paths(model, bert_loss, "lora", dtype="float64" if dtype == torch.float64 else "float32")
    for engine in (jvp, grads):
        engine.fit(train, methods=["exact"])
    for method in ("hyperinf", "exact"):
        expected = grads.score(train, val, method=method)
        actual = jvp.score(train, val, method=method)
        assert jvp.pass2_path == "jvp"
        assert float((actual - expected).norm() / expected.norm()) <= tolerance


def test_forward_mode_computes_no_per_sample_gradient(monkeypatch):
    model = mlp(dtype=torch.float64)
    train, val = mlp_data(20, 1), mlp_data(6, 2)
    engine = InfluenceEngine(model, mlp_loss, blocks="linear", progress=False, pass2="jvp", dtype="float64").fit(train)
    calls = []
    original = engine.gradients.__call__
    monkeypatch.setattr(type(engine.gradients), "__call__", lambda self, *a, **k: calls.append(1) or original(*a, **k))
    engine.score(train, val)
    assert engine.pass2_path == "jvp" and len(calls) == len(list(val))  # the validation gradient only


def test_pass2_runs_the_path_asked_for():
    model = mlp(dtype=torch.float64)
    train, val = mlp_data(20, 1), mlp_data(6, 2)
    uncached = InfluenceEngine(
        model, mlp_loss, blocks="linear", progress=False, cache_bytes=0, spill=False, dtype="float64"
    ).fit(train)
    uncached.score(train, val)
    assert uncached.pass2_path == "gradients"  # the default, even with nothing cached
    forced = InfluenceEngine(model, mlp_loss, blocks="linear", progress=False, pass2="jvp", dtype="float64").fit(train)
    forced.score(train, val)
    assert forced.pass2_path == "jvp"  # even with the gradients cached
    with pytest.raises(ConfigurationError, match="self-influence needs each example's gradient"):
        forced.score_methods(train, val, ["hyperinf"], self_influence="exact")
    with pytest.raises(ValueError, match="pass2 must be one of"):
        InfluenceEngine(model, mlp_loss, blocks="linear", pass2="auto")


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-5), ("float32", 1e-3)])
def test_forward_mode_on_a_peft_lora_llama_with_padding(dtype, tolerance):
    """A causal LM (tiny random Llama, rsLoRA on q_proj / v_proj) on instruction data: prompts of unequal
    length padded in a batch, the loss on the answer tokens only."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from hyperinf.app.learners import build_learner

    learner = build_learner("tiny-llama", ["negative", "positive"], rank=2, max_length=24)
    learner.model.to(torch.float64 if dtype == "float64" else torch.float32)
    torch.manual_seed(0)
    for name, param in learner.model.named_parameters():
        if "lora_B" in name:  # a trained adapter: lora_A's blocks get gradient too
            param.data.normal_(0, 0.1)
    words = "the film was really quite good bad today my trip food very so".split()
    pairs = [(" ".join(words[i % 5 : i % 5 + 2 + i % 7]), i % 2) for i in range(14)]
    train, val = learner.loader(pairs[:10], 4), learner.loader(pairs[10:], 4)
    jvp, grads = both_paths(learner.model, learner.loss, learner.blocks, dtype=dtype)
    for engine in (jvp, grads):
        engine.fit(train, methods=["exact"])
    for method in ("hyperinf", "exact", "tracin"):
        expected = grads.score(train, val, method=method)
        actual = jvp.score(train, val, method=method)
        assert jvp.pass2_path == "jvp" and grads.pass2_path == "gradients"
        assert float((actual - expected).norm() / expected.norm()) <= tolerance
