"""Turn influence scores into a training subset: the most helpful share of a candidate pool.

Helpful means the most negative score (``DESIGN.md``: up-weighting the example lowers the target
loss). Ties are broken by row index, lower first, so the same scores always give the same
selection. Usable without the command line:

    keep = select_top(scores, 0.2, labels, balance=True)   # row indices, most helpful first
    subset = [pool[i] for i in keep.tolist()]
"""

from __future__ import annotations

import math

import torch

from hyperinf.errors import DataError


def helpfulness_order(scores: torch.Tensor) -> torch.Tensor:
    """Row indices from the most helpful (most negative score) to the most harmful, ties by row index."""
    _check_scores(scores)
    return torch.sort(scores.detach().cpu().double(), stable=True).indices


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each row's rank, 0 for the most helpful (see :func:`helpfulness_order`)."""
    order = helpfulness_order(scores)
    result = torch.empty_like(order)
    result[order] = torch.arange(order.numel())
    return result


def selection_size(fraction: float, n: int, what: str = "the pool") -> int:
    """``round(fraction * n)``: how many of ``n`` examples a fraction keeps; at least one."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise DataError(f"--fraction / fraction must be in (0, 1] (a share of the pool), got {fraction}")
    k = round(fraction * n)
    if k < 1:
        raise DataError(
            f"a fraction of {fraction} of {what} ({n} examples) selects {fraction * n:.2f} < 1 example: "
            "raise --fraction / fraction or use a larger pool"
        )
    return k


def select_top(
    scores: torch.Tensor, fraction: float, labels: torch.Tensor | None = None, *, balance: bool = False
) -> torch.Tensor:
    """Row indices of the ``round(fraction * n)`` most helpful examples, most helpful first.

    ``balance`` (needs ``labels``) keeps ``round(fraction * n_c)`` of every label ``c`` instead, so a
    selection cannot collapse onto one class; the result is still in helpfulness order.
    """
    order = helpfulness_order(scores)
    n = order.numel()
    if not balance:
        return order[: selection_size(fraction, n)]
    if labels is None:
        raise DataError("balance=True / --balance needs the pool's labels: pass labels")
    labels = labels.detach().cpu()
    if labels.shape != scores.shape:
        raise DataError(
            f"labels {tuple(labels.shape)} and scores {tuple(scores.shape)} differ in shape: one label per scored example"
        )
    keep = torch.zeros(n, dtype=torch.bool)
    for label in labels.unique().tolist():
        in_class = order[labels[order] == label]  # this class's rows, most helpful first
        keep[in_class[: selection_size(fraction, in_class.numel(), f"label {label}")]] = True
    return order[keep[order]]


def cosine_scores(scores: torch.Tensor, direction_norm: float, gradient_norms: torch.Tensor) -> torch.Tensor:
    """Scores ``-<h, g_k>`` turned into ``-cos(h, g_k)`` (LESS's normalisation against long-gradient bias)."""
    if direction_norm <= 0 or not math.isfinite(direction_norm):
        raise DataError(
            f"the preconditioned target gradient has norm {direction_norm}: the target set gives no direction to compare with"
        )
    norms = gradient_norms.to(scores.dtype)
    zero = int((norms <= 0).sum())
    if zero:
        raise DataError(
            f"{zero} pool examples have a zero gradient (e.g. an answer truncated away): their cosine is undefined; drop them"
        )
    return scores / (direction_norm * norms)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 1 or scores.numel() == 0:
        raise DataError(
            f"scores must be one value per pool example (a non-empty 1-D tensor), got shape {tuple(scores.shape)}"
        )
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise DataError(
            f"{bad} of {scores.numel()} scores are NaN or infinite: check the method's diagnostics (damping, convergence)"
        )


def round_robin(rankings: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` row indices taken in turns: target 0 takes its best row not yet taken, then target 1, and so on
    (BIDS' answer to a few targets dominating a selection by the mean). ``rankings`` ``[m, depth]`` lists
    each target's rows from the most helpful down, e.g. :meth:`hyperinf.InfluenceEngine.top_k`'s
    ``helpful``; a depth of ``size`` always suffices, as fewer than ``size`` rows are taken before any turn.
    Each target's own ranking is what counts, so normalising a target's scores over the pool changes nothing.
    """
    if rankings.ndim != 2 or rankings.shape[0] == 0:
        raise DataError(f"rankings must be [targets, depth] with at least one target, got {tuple(rankings.shape)}")
    lists = rankings.detach().cpu().tolist()
    cursor = [0] * len(lists)
    taken: dict[int, None] = {}
    target = 0
    while len(taken) < size and any(c < len(row) for c, row in zip(cursor, lists)):
        row = lists[target]
        while cursor[target] < len(row) and row[cursor[target]] in taken:
            cursor[target] += 1
        if cursor[target] < len(row):
            taken[row[cursor[target]]] = None
        target = (target + 1) % len(lists)
    if len(taken) < size:
        raise DataError(
            f"the targets' rankings hold {len(taken)} distinct rows, fewer than the {size} to select: rank each "
            f"target's {size} best rows (top_k with k={size})"
        )
    return torch.tensor(list(taken), dtype=torch.long)


def representation_scores(pool: torch.Tensor, target: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """RDS+ (no gradients): ``-cos`` between each pool row's representation ``[n, H]`` and the targets'
    ``[m, H]``, the max (or the mean) over the targets, negated so that, as for influence scores, the most
    helpful row has the most negative score and :func:`select_top` keeps it first."""
    if reduce not in ("max", "mean"):
        raise DataError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    if pool.ndim != 2 or target.ndim != 2 or pool.shape[1] != target.shape[1] or target.shape[0] == 0:
        raise DataError(
            f"representations must be [rows, H] with the same H and at least one target, got {tuple(pool.shape)} "
            f"and {tuple(target.shape)}"
        )
    cosine = (
        torch.nn.functional.normalize(pool.double(), dim=1) @ torch.nn.functional.normalize(target.double(), dim=1).T
    )
    return -(cosine.max(dim=1).values if reduce == "max" else cosine.mean(dim=1))
