"""Our ``kfac`` / ``ekfac`` pairwise scores against kronfluence 1.0.1's, on a tiny MLP and a tiny BERT + LoRA (float64).

kronfluence is installed by ``make test`` (``pip install --no-deps kronfluence==1.0.1 einops einconv
opt_einsum``: its metadata asks for torchvision) and imported unconditionally: without it this file
fails rather than skips. The library itself never imports it. Both sides
run on the same model, data, blocks and batches; kronfluence with ``Analyzer(cpu=True)``, every
dtype set to float64, ``use_empirical_fisher=True`` (the true labels, as our per-example losses use,
not labels sampled from the model) and an absolute damping (``damping_factor``; ours
``damping_mode="absolute"``). The conventions that differ, and how each comparison maps them:

- Sign and layout: kronfluence returns ``[n_query, n_train]`` with positive = helpful
  (``g_query^T P g_train``); ours is ``[n_train, n_query]`` with positive = harmful
  (``-g_train^T P g_query``). We compare ours with ``-theirs.T``.
- Loss scale: kronfluence's task returns a batch loss and its factors read the output gradients of
  that loss, so its task sums the per-example losses (a mean would scale every ``delta`` by ``1/B``
  and the factors by ``1/B^2``); ours takes the per-example losses ``[B]`` themselves.
- Bias: both append a 1 to the layer input of a layer with a bias (MLP); LoRA layers have none.
- Padding: both drop padded tokens from the input covariance and its token count (kronfluence through
  ``Task.get_attention_mask``; its padded output gradients are exactly zero for a classifier).
- K-FAC's output-gradient factor: kronfluence divides ``sum delta delta^T`` by the number of
  tokens ``N``, we by the number of examples ``n`` (so that ``S (x) A`` is the per-example Fisher for
  examples of one token). With one token per example (the MLP) the factors are equal. With ``T = N / n``
  tokens per example (BERT) our K-FAC curvature is ``T`` times theirs, the same ``T`` for every block,
  so ours with damping ``lambda`` equals theirs with ``lambda / T`` divided by ``T``: the test damps and
  rescales kronfluence that way, and the scores are then equal, not only correlated.
- EK-FAC: the eigenbases do not depend on that scale, and both refit ``Lambda = (1/n) sum_k
  (Q_S^T G_k Q_A)^2`` per example, so the same damping gives equal scores. kronfluence's heuristic
  damping (``damping_factor=None``: 0.1 times the mean of ``Lambda``, per block) is our default
  relative damping ``c = 0.1``.

The bound asked for is Pearson >= 0.999; the measured agreement is far tighter (relative
difference <= 4e-15, float64), and each test also asserts that.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from models import (
    bert_loss,
    mlp,
    mlp_batch,
    mlp_loss,
    random_padded_batch,
    tiny_bert_lora,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hyperinf import InfluenceEngine

F64 = torch.float64
BATCH = 16
DAMPING = 1e-3


class Rows(Dataset):
    """The rows of a padded dict batch, one example each (the default collate stacks them back)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


class MLPTask(Task):
    """Summed cross-entropy on ``(x, y)`` with the true labels, for training loss and measurement alike."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        return mlp_loss(model, batch).sum()

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return mlp_loss(model, batch).sum()


class LoraTask(Task):
    """Summed cross-entropy of a sequence classifier, tracking only the given LoRA modules, padding masked."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = modules

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        return bert_loss(model, batch).sum()

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return bert_loss(model, batch).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"]


def theirs(
    model: nn.Module, task: Task, train: Dataset, query: Dataset, strategy: str, damping: float | None, out: Path
) -> torch.Tensor:
    """kronfluence's pairwise scores in our convention: ``[n_train, n_query]``, positive = harmful."""
    analyzer = Analyzer(
        "agreement", prepare_model(copy.deepcopy(model), task), task, cpu=True, output_dir=str(out), disable_tqdm=True
    )
    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=True,
        activation_covariance_dtype=F64,
        gradient_covariance_dtype=F64,
        per_sample_gradient_dtype=F64,
        lambda_dtype=F64,
    )
    analyzer.fit_all_factors("factors", train, per_device_batch_size=BATCH, factor_args=factor_args)
    score_args = ScoreArguments(
        damping_factor=damping, per_sample_gradient_dtype=F64, precondition_dtype=F64, score_dtype=F64
    )
    analyzer.compute_pairwise_scores(
        "scores",
        "factors",
        query,
        train,
        per_device_query_batch_size=BATCH,
        per_device_train_batch_size=BATCH,
        score_args=score_args,
    )
    return -analyzer.load_pairwise_scores("scores")["all_modules"].T


def ours(
    model: nn.Module, loss_fn: Any, blocks: str, train: Dataset, query: Dataset, method: str, **options: Any
) -> torch.Tensor:
    """Our pairwise scores ``[n_train, n_query]`` in float64 (positive = harmful)."""
    engine = InfluenceEngine(model, loss_fn, blocks=blocks, method=method, dtype="float64", progress=False, **options)
    train_loader = DataLoader(train, batch_size=BATCH)
    engine.fit(train_loader)
    return engine.pairwise(train_loader, DataLoader(query, batch_size=BATCH))


def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    pearson = float(torch.corrcoef(torch.stack([actual.flatten(), expected.flatten()]).double())[0, 1])
    relative = float((actual - expected).norm() / expected.norm())
    assert pearson >= 0.999, pearson
    assert relative < 1e-10, relative  # measured <= 4e-15


@pytest.fixture(scope="module")
def mlp_data() -> tuple[nn.Module, Dataset, Dataset]:
    train, query = TensorDataset(*mlp_batch(64, dtype=F64, seed=1)), TensorDataset(*mlp_batch(7, dtype=F64, seed=2))
    return mlp(dtype=F64), train, query


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_mlp_with_biases_equals_kronfluence(mlp_data, method, tmp_path):
    model, train, query = mlp_data
    expected = theirs(model, MLPTask(), train, query, method, DAMPING, tmp_path)
    check(ours(model, mlp_loss, "linear", train, query, method, damping=DAMPING, damping_mode="absolute"), expected)


def test_ekfac_default_damping_is_kronfluence_heuristic(mlp_data, tmp_path):
    model, train, query = mlp_data
    expected = theirs(model, MLPTask(), train, query, "ekfac", None, tmp_path)
    check(ours(model, mlp_loss, "linear", train, query, "ekfac", damping=0.1, damping_mode="relative"), expected)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_bert_lora_with_padding_equals_kronfluence(method, tmp_path):
    model = tiny_bert_lora(dtype=F64)
    lora = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (".lora_A." in n or ".lora_B." in n)]
    train = Rows(random_padded_batch(32, max_len=12, min_len=3, seed=1))
    query = Rows(random_padded_batch(5, max_len=12, min_len=3, seed=2))
    tokens_per_example = float(train.batch["attention_mask"].sum()) / len(train)
    assert tokens_per_example > 2  # the K-FAC rescaling below is not vacuous
    scale = tokens_per_example if method == "kfac" else 1.0
    expected = theirs(model, LoraTask(lora), train, query, method, DAMPING / scale, tmp_path) / scale
    check(ours(model, bert_loss, "lora", train, query, method, damping=DAMPING, damping_mode="absolute"), expected)
