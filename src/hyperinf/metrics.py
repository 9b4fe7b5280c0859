"""Metrics of attribution quality: how well scores rank known-bad (e.g. mislabeled) examples first,
and how well they predict the losses of models retrained on subsets (the linear datamodeling score)."""

from __future__ import annotations

import torch

from hyperinf.errors import DataError

INSPECTED = (0.1, 0.2, 0.3, 0.4, 0.5)
"""The inspection rates of the paper's detection tables (Table 2)."""


def detection_summary(
    scores: torch.Tensor, is_bad: torch.Tensor, inspected: tuple[float, ...] = INSPECTED
) -> dict[str, float]:
    """``{"detected@10%": ..., ..., "roc_auc": ...}``: the detection rates at ``inspected`` and ROC-AUC."""
    rates = {f"detected@{round(f * 100)}%": detection_rate(scores, is_bad, f) for f in inspected}
    return {**rates, "roc_auc": roc_auc(scores, is_bad)}


def detection_curve(scores: torch.Tensor, is_bad: torch.Tensor) -> torch.Tensor:
    """Share of bad examples found after inspecting the top ``k`` scores, for ``k = 1..n``.

    Examples are inspected from the highest score down (most harmful first); ties keep input order.
    """
    is_bad = is_bad.to(torch.bool)
    total = int(is_bad.sum())
    if total == 0:
        raise ValueError("detection rate needs at least one bad (e.g. flipped) example")
    order = torch.sort(scores, descending=True, stable=True).indices
    return is_bad[order].cumsum(0).double() / total


def detection_rate(scores: torch.Tensor, is_bad: torch.Tensor, inspected: float) -> float:
    """Share of bad examples among the top ``ceil(inspected * n)`` scores (``inspected`` in [0, 1])."""
    if not 0.0 <= inspected <= 1.0:
        raise ValueError(f"inspected must be a fraction in [0, 1], got {inspected}")
    k = int(torch.ceil(torch.tensor(inspected * scores.numel())).item())
    return 0.0 if k == 0 else float(detection_curve(scores, is_bad)[k - 1])


def roc_auc(scores: torch.Tensor, is_bad: torch.Tensor) -> float:
    """Probability that a random bad example scores above a random good one (ties count half)."""
    is_bad = is_bad.to(torch.bool)
    n_bad, n_good = int(is_bad.sum()), int((~is_bad).sum())
    if n_bad == 0 or n_good == 0:
        raise ValueError("ROC-AUC needs both bad and good examples")
    ranks = _average_ranks(scores.double())
    return float((ranks[is_bad].sum() - n_bad * (n_bad + 1) / 2) / (n_bad * n_good))


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing the mean of their positions (Mann-Whitney convention)."""
    sorted_values, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of ``x`` and ``y`` along the last dimension (ties get average ranks).

    Both have the same shape ``[..., n]``; the result has shape ``[...]`` and is NaN where either row is constant.
    """
    if x.shape != y.shape or x.dim() == 0 or x.shape[-1] < 2:
        raise DataError(
            f"spearman needs two tensors of one shape [..., n] with n >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n = x.shape[-1]
    ranks = [torch.stack([_average_ranks(row) for row in t.reshape(-1, n).double()]) for t in (x, y)]
    rx, ry = (r - r.mean(-1, keepdim=True) for r in ranks)
    correlation = (rx * ry).sum(-1) / (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return correlation.reshape(x.shape[:-1])


def linear_datamodeling_score(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Per query, the LDS of Park et al. (2023): Spearman over subsets of the summed scores of each subset's members
    and the query's loss after retraining on that subset, ``[n_query]``.

    ``scores`` ``[n_train, n_query]`` are the full model's pairwise influence scores, ``masks`` ``[M, n_train]``
    which training examples each subset holds and ``losses`` ``[M, n_query]`` the losses measured after retraining.
    With hyperinf's sign (positive = harmful: up-weighting the example raises the query's loss), a subset that
    keeps more harmful examples should end with a higher loss, so a good method's LDS is close to +1.
    """
    if scores.dim() != 2 or masks.dim() != 2 or losses.dim() != 2:
        raise DataError(
            f"LDS needs scores [n_train, n_query], masks [M, n_train] and losses [M, n_query]; "
            f"got {tuple(scores.shape)}, {tuple(masks.shape)} and {tuple(losses.shape)}"
        )
    (n_train, n_query), (subsets, members) = scores.shape, masks.shape
    if members != n_train or losses.shape != (subsets, n_query):
        raise DataError(
            f"LDS shapes disagree: scores {tuple(scores.shape)} = [n_train, n_query] needs masks [M, {n_train}] and "
            f"losses [M, {n_query}], got masks {tuple(masks.shape)} and losses {tuple(losses.shape)}"
        )
    predicted = masks.to(torch.float64) @ scores.to(torch.float64)
    return spearman(predicted.T, losses.to(torch.float64).T)


def bootstrap_interval(
    values: torch.Tensor, level: float = 0.95, draws: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (1-D), resampling them with replacement (seeded)."""
    if values.dim() != 1 or values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise DataError(
            f"bootstrap_interval needs a non-empty 1-D tensor of finite values, got shape {tuple(values.shape)}"
        )
    if not 0.0 < level < 1.0 or draws < 1:
        raise DataError(f"bootstrap_interval needs 0 < level < 1 and draws >= 1, got level={level}, draws={draws}")
    picks = torch.randint(values.numel(), (draws, values.numel()), generator=torch.Generator().manual_seed(seed))
    means = values.double()[picks].mean(1)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return low, high
