"""``hyperinf index build`` / ``query`` on a user's saved model, adapter and rows, against test_score's hand
computation (looped single-example LoRA gradients, a Cholesky solve of the damped GFIM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_score import ROWS, loaded_peft, reference_scores, write_jsonl

from hyperinf.cli import main

pytest.importorskip("peft")

ROWS_WITH_A_GAP = [
    *ROWS["prompt-completion"][:2],
    {"prompt": "Empty", "completion": ""},
    *ROWS["prompt-completion"][2:],
]


def build(user_models: Any, train: Path, out: Path, *args: Any) -> int:
    lm = ["--model", user_models.llama, "--adapter", user_models.adapter, "--train", train, "--out", out]
    return main(["index", "build", "--no-progress", *map(str, [*lm, *args])])


def query(index: Path, out: Path, *args: Any) -> int:
    return main(["index", "query", "--index", str(index), "--out", str(out), *map(str, args)])


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_whole_index_answers_each_target_with_its_exact_proponents_and_opponents(
    user_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """float64 model, float32 rows: every listed score is the reference score of that row for that target."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS_WITH_A_GAP)
    targets = ROWS["prompt-completion"][1:3]
    target = write_jsonl(tmp_path / "target.jsonl", targets)
    index = tmp_path / "index"
    options = ["--dim", 0, "--storage", "float32", "--model-dtype", "float64", "--batch-size", 3]
    assert build(user_models, train, index, *options) == 0
    assert "indexed 4 training rows" in capsys.readouterr().out
    assert query(index, tmp_path / "q", "--target", target, "-k", 2, "--method", "exact") == 0
    answers = records(tmp_path / "q" / "query.jsonl")
    assert [a["target"] for a in answers] == [0, 1] and [a["text"] for a in answers][0].startswith("Two plus two")
    model, tokenizer = loaded_peft(user_models)
    used = [row for i, row in enumerate(ROWS_WITH_A_GAP) if i != 2]  # row 2 has no completion: skipped
    row_ids = [0, 1, 3, 4]
    for answer, row in zip(answers, targets):
        exact = reference_scores(model, tokenizer, "prompt-completion", used, [row])["exact"]
        order = exact.argsort()
        expected_proponents = [row_ids[i] for i in order[:2].tolist()]
        expected_opponents = [row_ids[i] for i in order.flip(0)[:2].tolist()]
        assert [p["row"] for p in answer["proponents"]] == expected_proponents
        assert [p["row"] for p in answer["opponents"]] == expected_opponents
        listed = torch.tensor([p["score"] for p in answer["proponents"] + answer["opponents"]], dtype=torch.float64)
        reference = exact[torch.cat([order[:2], order.flip(0)[:2]])]
        torch.testing.assert_close(listed, reference, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
        assert all(ROWS_WITH_A_GAP[p["row"]]["prompt"] in p["text"] for p in answer["proponents"])
    recorded = json.loads((tmp_path / "q" / "arguments.json").read_text())
    assert recorded["index"]["rows"] == 4 and recorded["args"]["method"] == "exact"


def test_a_rebuild_keeps_the_index_and_queries_take_text(
    user_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS["text"])
    index = tmp_path / "index"
    assert build(user_models, train, index, "--dim", 64) == 0
    assert "indexed 4 training rows" in capsys.readouterr().out
    chunks = {p: p.stat().st_mtime_ns for p in index.glob("chunk-*.safetensors")}
    assert build(user_models, train, index, "--dim", 64) == 0
    assert {p: p.stat().st_mtime_ns for p in index.glob("chunk-*.safetensors")} == chunks
    assert build(user_models, train, index, "--dim", 32) == 2
    assert "holds an index built with --dim 64: choose another --out" in capsys.readouterr().err
    edited = write_jsonl(tmp_path / "edited.jsonl", [{"text": r["text"] + "!"} for r in ROWS["text"]])
    assert build(user_models, edited, index, "--dim", 64) == 2  # as many rows, other text: not the same index
    assert "other settings (source differ)" in capsys.readouterr().err
    assert json.loads((index / "rows.jsonl").read_text().splitlines()[0])["text"] == ROWS["text"][0]["text"]
    assert query(index, tmp_path / "q", "--query", "The quick brown fox", "--query", "gold", "-k", 10) == 0
    answers = records(tmp_path / "q" / "query.jsonl")
    assert [a["text"] for a in answers] == ["The quick brown fox", "gold"]
    assert all(len(a["proponents"]) == 4 for a in answers)  # k capped at the indexed rows
    scores = [p["score"] for p in answers[0]["proponents"]]
    assert scores == sorted(scores)
    assert query(index, tmp_path / "f", "--query", "The quick brown fox", "--query", "gold", "--faiss", "Flat") == 0
    through_faiss = records(tmp_path / "f" / "query.jsonl")
    for mine, theirs in zip(through_faiss, answers):
        for side in ("proponents", "opponents"):
            assert [p["row"] for p in mine[side]] == [p["row"] for p in theirs[side]]
            torch.testing.assert_close(
                torch.tensor([p["score"] for p in mine[side]]), torch.tensor([p["score"] for p in theirs[side]])
            )


def test_an_index_built_for_kfac_holds_its_factors_and_queries_with_it_by_default(
    user_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whole and float32, K-FAC from the index lists the same proponents as K-FAC from the engine's fit, and
    a folder of a GFIM build is not reused for it."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS["text"])
    index = tmp_path / "index"
    options = ["--dim", 0, "--storage", "float32", "--model-dtype", "float64"]
    assert build(user_models, train, index, *options, "--method", "kfac") == 0
    assert (index / "kronecker.safetensors").is_file()
    assert query(index, tmp_path / "q", "--query", "The quick brown fox", "-k", 4) == 0
    assert json.loads((tmp_path / "q" / "arguments.json").read_text())["args"]["method"] == "kfac"
    answer = records(tmp_path / "q" / "query.jsonl")[0]
    score = ["--model", user_models.llama, "--adapter", user_models.adapter, "--train", train, "--methods", "kfac"]
    more = ["--query", "The quick brown fox", "-k", 4, "--model-dtype", "float64", "--out", tmp_path / "s"]
    assert main(["score", "--no-progress", *map(str, score + more)]) == 0
    scored = records(tmp_path / "s" / "top_k.jsonl")[0]
    assert [p["row"] for p in answer["proponents"]] == [p["row"] for p in scored["proponents"]]
    torch.testing.assert_close(
        torch.tensor([p["score"] for p in answer["proponents"]]),
        torch.tensor([p["score"] for p in scored["proponents"]]),
        rtol=1e-4,
        atol=0.0,
    )
    capsys.readouterr()
    assert build(user_models, train, index, *options) == 2
    assert "holds an index built with Kronecker factors" in capsys.readouterr().err


def test_user_errors_are_one_line_and_write_nothing(
    user_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS["text"])
    assert build(user_models, train, tmp_path / "index", "--dim", 64) == 0
    out = tmp_path / "out"
    for run, says in (
        (lambda: query(tmp_path / "index", out, "--query", "a", "--method", "datainf"), "cannot precondition in an"),
        (
            lambda: query(tmp_path / "index", out, "--query", "a", "--method", "ekfac"),
            "--method ekfac) in another folder",
        ),
        (lambda: build(user_models, train, out, "--method", "lissa", "--dim", 8, "--method", "datainf"), "'datainf'"),
        (lambda: build(user_models, train, out, "--dim", -1), "--dim -1: must be at least 0"),
        (lambda: query(tmp_path / "nothing", out, "--query", "a"), "holds no gradient index"),
        (lambda: main(["index", "query", "--query", "a", "--out", str(out)]), "--index is required"),
        (lambda: query(tmp_path / "index", out, "--query", "a", "--faiss-parameters", "nprobe=2"), "give --faiss"),
        (lambda: query(tmp_path / "index", out, "--query", "a", "--faiss", "Nonsense"), "not a faiss index factory"),
    ):
        code = run()
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("hyperinf: error:") and "\n" not in err and says in err, err
        assert not out.exists()
