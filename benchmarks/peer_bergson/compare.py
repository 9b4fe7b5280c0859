"""Compare bergson's projected-gradient scores with `hyperinf index`'s on the same rows (run.sh writes both).

    python benchmarks/peer_bergson/compare.py OUT_DIR

bergson's score of (training row, query) is +<P g, P q> (no preconditioner, larger = more helpful), from its two
indices; ours is -<P g, A_P^-1 P q> (negated here to bergson's sign), from query.jsonl (-k 200: every row).
Prints the mean Spearman over queries between the two, and each one's top-5 topic precision (chance: 0.25).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

HERE = Path(__file__).parent


def bergson_index(folder: Path) -> np.ndarray:
    """bergson's gradients.bin: a raw row-major [rows, sum of module sizes] array, dtype and sizes in info.json."""
    info = json.loads((folder / "info.json").read_text())
    shape = (info["num_grads"], sum(info["grad_sizes"].values()))
    return np.asarray(np.memmap(folder / "gradients.bin", dtype=np.dtype(info["base_dtype"]), mode="r", shape=shape))


def ours(folder: Path, rows: int) -> np.ndarray:
    """[rows, queries] scores from a query.jsonl listing every row as a proponent, in bergson's sign."""
    records = [json.loads(line) for line in (folder / "query.jsonl").read_text().splitlines()]
    scores = np.full((rows, len(records)), np.nan)
    for j, record in enumerate(records):
        for proponent in record["proponents"]:
            scores[proponent["row"], j] = -proponent["score"]
    assert not np.isnan(scores).any(), "run the query with -k at least the number of rows"
    return scores


def precision(scores: np.ndarray, train: list[dict], queries: list[dict], k: int = 5) -> float:
    top = np.argsort(-scores, axis=0)[:k].T
    return float(np.mean([train[i]["topic"] == queries[j]["topic"] for j in range(len(queries)) for i in top[j]]))


def main(out: Path) -> None:
    train = [json.loads(line) for line in (HERE / "train.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (HERE / "query.jsonl").read_text().splitlines()]
    theirs = bergson_index(out / "bergson" / "train_idx").astype(np.float64)
    theirs = theirs @ bergson_index(out / "bergson" / "query_idx").astype(np.float64).T
    print(f"bergson: top-5 topic precision {precision(theirs, train, queries):.2f}")
    for method in ("tracin", "hyperinf"):
        mine = ours(out / "ours" / method, len(train))
        rho = np.mean([spearmanr(mine[:, j], theirs[:, j]).correlation for j in range(len(queries))])
        print(
            f"ours {method}: Spearman with bergson {rho:.3f}, top-5 topic precision {precision(mine, train, queries):.2f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
