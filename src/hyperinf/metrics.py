"""Metrics of attribution quality: how well scores rank known-bad (e.g. mislabeled) examples first."""

from __future__ import annotations

import torch

INSPECTED = (0.1, 0.2, 0.3, 0.4, 0.5)
"""The inspection rates of the paper's detection tables (Table 2)."""


def detection_summary(scores: torch.Tensor, is_bad: torch.Tensor, inspected: tuple[float, ...] = INSPECTED) -> dict[str, float]:
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
