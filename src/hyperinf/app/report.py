"""What the experiments print and draw: the detection table, the training examples ranked most harmful, figures."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hyperinf.metrics import INSPECTED
from hyperinf.results import atomic_write


def new_figure(width: float = 6.0, height: float = 4.5) -> tuple[Any, Any]:
    """A one-axes matplotlib figure drawn off-screen (no display needed); finish it with :func:`save_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig: Any, ax: Any, path: Path) -> None:
    """Grid, legend and tight layout on a one-axes figure, written atomically as a PNG, then closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def print_detection_table(entries: Sequence[Mapping[str, Any]], title: str, seeds: int = 1) -> None:
    """One line per method: the share of flipped labels found at each inspection rate, ROC-AUC and
    the iHVP time; each rate as ``mean±std`` (keys ``<column>_std``) only when ``seeds > 1``."""
    spread = seeds > 1
    width = 15 if spread else 9
    columns = [f"detected@{round(f * 100)}%" for f in INSPECTED] + ["roc_auc"]
    print(f"\n{title} ({seeds} seeds, mean ± std)" if spread else f"\n{title}")
    names = [f"@{round(f * 100)}%" for f in INSPECTED] + ["ROC-AUC"]
    print(f"{'method':>16}" + "".join(f"{name:>{width}}" for name in names) + f"{'iHVP s':>10}")
    for entry in entries:
        line = f"{entry['method']:>16}"
        for column in columns:
            line += f"{entry[column]:>9.3f}" + (f"±{entry[column + '_std']:.3f}" if spread else "")
        seconds = entry.get("ihvp_seconds")
        print(line + (f"{seconds:>10.3f}" if seconds is not None else ""))


def print_suspects(
    scores: Mapping[str, torch.Tensor],
    methods: Sequence[str],
    labels: torch.Tensor,
    predicted: torch.Tensor,
    flipped: torch.Tensor,
    label_names: Sequence[str],
    texts: Sequence[str] | None = None,
    k: int = 10,
) -> None:
    """The ``k`` training examples HyperINF (or the first of ``methods``, when it did not run) scores
    most harmful: their index, score, whether the label was planted (flipped), the given and the
    predicted label, and the text cut to the rest of one terminal line."""
    method = "hyperinf" if "hyperinf" in methods else methods[0]
    top = torch.sort(scores[method], descending=True, stable=True).indices[:k].tolist()
    label_width = max(9, *(len(name) for name in label_names))
    print(f"\nthe {len(top)} training examples {method} ranks most harmful (most likely mislabeled):")
    header = f"{'index':>7}{'score':>11}  {'flipped':<8}{'given':<{label_width + 2}}{'predicted':<{label_width + 2}}"
    print((header + ("text" if texts is not None else "")).rstrip())
    room = max(shutil.get_terminal_size().columns, 80) - len(header) - 1
    for i in top:
        line = f"{i:>7}{float(scores[method][i]):>11.4g}  {'yes' if flipped[i] else 'no':<8}"
        line += f"{label_names[int(labels[i])]:<{label_width + 2}}{label_names[int(predicted[i])]:<{label_width + 2}}"
        if texts is not None:
            text = " ".join(texts[i].split())
            line += text if len(text) <= room else text[: room - 1] + "…"
        print(line.rstrip())
