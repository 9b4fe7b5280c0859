"""Brute-force references shared by the tests (import as ``from references import ...``)."""

from __future__ import annotations

import torch


def pairwise_auc(scores: torch.Tensor, bad: torch.Tensor) -> float:
    """ROC-AUC by counting every (bad, good) pair: 1 where the bad example scores higher, 1/2 on a tie."""
    bad_scores = scores[bad].tolist()
    good_scores = scores[~bad].tolist()
    wins = sum((b > g) + 0.5 * (b == g) for b in bad_scores for g in good_scores)
    return wins / (len(bad_scores) * len(good_scores))
