"""``hyperinf score`` on a user's saved model, adapter and data, against a hand computation.

The reference never uses :mod:`hyperinf.hf`: it finds each format's scored tokens its own way
(the chat turns from the chat template's token prefixes), takes single-example gradients of the
LoRA weights by autograd on unpadded sequences, and solves the damped GFIM by Cholesky.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from hyperinf.cli import main

pytest.importorskip("peft")

CHATS = [
    [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "another one"},
        {"role": "assistant", "content": "a dark green, like a forest"},
    ],
    [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there, how are you?"}],
    [{"role": "user", "content": "count to three"}, {"role": "assistant", "content": "one two three"}],
]
ROWS: dict[str, list[dict[str, Any]]] = {
    "prompt-completion": [
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "Two plus two equals", "completion": " four, of course"},
        {"prompt": "Translate 'cat' to German:", "completion": " Katze"},
        {"prompt": "The sky is", "completion": " blue on a clear day"},
    ],
    "alpaca": [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
        {"instruction": "Reverse the word.", "input": "stop", "output": "pots"},
        {"instruction": "Say yes.", "input": None, "output": "Yes!"},
    ],
    "chat": [{"messages": m} for m in CHATS],
    "multiple-choice": [
        {"question": "Which is a colour?", "choices": ["red", "dog", "seven"], "answer": 0},
        {"question": "Which is an animal?", "choices": ["blue", "cat", "nine"], "answer": "cat"},
        {"question": "Which is a number?", "choices": ["green", "horse", "three hundred"], "answer": 2},
        {"question": "Which can fly?", "choices": ["a rock", "a bird"], "answer": 1},
    ],
    "text": [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"text": "A stitch in time saves nine."},
        {"text": "All that glitters is not gold"},
        {"text": "Hello"},
    ],
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scored_positions(tokenizer: Any, layout: str, row: dict[str, Any]) -> tuple[list[int], list[bool]]:
    """A row's token ids and, per position, whether its token is in the loss, found without hyperinf.hf."""
    eos = [tokenizer.eos_token_id]
    if layout == "chat":
        messages = row["messages"]
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        scored = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(
                    tokenizer.apply_chat_template(
                        messages[:i], tokenize=True, add_generation_prompt=True, return_dict=True
                    )["input_ids"]
                )
                end = len(
                    tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
                )
                scored[start:end] = [True] * (end - start)
        return ids, scored
    if layout == "text":
        ids = tokenizer(row["text"])["input_ids"] + eos
        return ids, [False] + [True] * (len(ids) - 1)
    if layout == "prompt-completion":
        prompt, completion = row["prompt"], tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
    elif layout == "alpaca":
        parts = [row["instruction"]] + ([row["input"]] if row["input"] else [])
        prompt = "\n\n".join(parts) + "\n\n"
        completion = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + eos
    else:
        answer = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        prompt = f"Question: {row['question']}\nAnswer:"
        completion = tokenizer(" " + row["choices"][answer], add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt)["input_ids"]
    return head + completion, [False] * len(head) + [True] * len(completion)


def lora_gradients(model: Any, ids: list[int], scored: list[bool]) -> dict[str, torch.Tensor]:
    """Per LoRA block, the gradient of the mean NLL of the scored tokens, laid out r x d (lora_B transposed)."""
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    targets = torch.tensor(ids[1:])
    mask = torch.tensor(scored[1:])
    loss = F.cross_entropy(logits[:-1][mask], targets[mask])
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: (g.T if "lora_B" in n else g).detach() for n, g in zip(params, grads)}


def reference_scores(
    model: Any, tokenizer: Any, layout: str, train: list[dict[str, Any]], target: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """TracIn and the exact damped-GFIM (Cholesky) scores of every training row against the target mean."""
    g = [lora_gradients(model, *scored_positions(tokenizer, layout, r)) for r in train]
    v_rows = [lora_gradients(model, *scored_positions(tokenizer, layout, r)) for r in target]
    v = {name: torch.stack([x[name] for x in v_rows]).mean(0) for name in g[0]}
    n = len(g)
    tracin = torch.tensor([-sum((v[b] * gk[b]).sum() for b in v) for gk in g])
    exact = torch.zeros(n, dtype=torch.float64)
    for b in v:
        stack = torch.stack([gk[b] for gk in g])  # [n, r, d]
        r, d = stack.shape[1:]
        gfim = torch.einsum("nrd,nre->de", stack, stack) / n
        damping = 0.1 * (stack**2).sum() / (n * r * d)
        h = torch.linalg.solve(gfim + damping * torch.eye(d, dtype=gfim.dtype), v[b].T).T
        exact -= torch.einsum("rd,nrd->n", h, stack)
    return {"tracin": tracin, "exact": exact}


def loaded_peft(user_models: Any) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(user_models.llama), dtype=torch.float64)
    model = PeftModel.from_pretrained(base, str(user_models.adapter), is_trainable=True).eval()
    return model, AutoTokenizer.from_pretrained(str(user_models.llama))


def run(*args: Any) -> int:
    return main(["score", "--no-progress", *map(str, args)])


def run_lm(user_models: Any, *args: Any) -> int:
    """``hyperinf score`` on the saved tiny Llama with its adapter."""
    return run("--model", user_models.llama, "--adapter", user_models.adapter, *args)


@pytest.mark.parametrize("layout", list(ROWS))
def test_scores_match_single_example_autograd_in_every_format(user_models: Any, tmp_path: Path, layout: str) -> None:
    """float64, 1e-6: a prompt token in the loss, a missed assistant turn or padding would all show."""
    rows = ROWS[layout]
    train, target = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "target.jsonl", rows[:2])
    out = tmp_path / "out"
    assert (
        run_lm(
            user_models,
            "--train",
            train,
            "--target",
            target,
            "--methods",
            "exact,tracin",
            "--model-dtype",
            "float64",
            "--batch-size",
            3,
            "--out",
            out,
        )
        == 0
    )
    model, tokenizer = loaded_peft(user_models)
    expected = reference_scores(model, tokenizer, layout, rows, rows[:2])
    table = pd.read_parquet(out / "scores.parquet")
    assert table["row"].tolist() == list(range(len(rows)))
    for method in ("exact", "tracin"):
        actual = torch.tensor(table[f"score_{method}"].to_numpy())
        torch.testing.assert_close(actual, expected[method], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.tensor(table["score"].to_numpy()), expected["exact"], rtol=1e-6, atol=1e-9)
    top = [json.loads(line) for line in (out / "top_k.jsonl").read_text().splitlines()]
    assert [t["target"] for t in top] == [0, 1]
    assert all(len(t["proponents"]) == len(rows) for t in top)
    args = json.loads((out / "arguments.json").read_text())
    assert args["format"] == ("prompt-completion" if layout == "alpaca" else layout)


def test_prompt_tokens_in_the_loss_would_change_the_scores(user_models: Any) -> None:
    """The reference above is sensitive to what it scores: counting the prompt moves TracIn's scores."""
    model, tokenizer = loaded_peft(user_models)
    rows = ROWS["prompt-completion"]
    honest = reference_scores(model, tokenizer, "prompt-completion", rows, rows[:2])["tracin"]
    leaky = reference_scores(
        model,
        tokenizer,
        "text",
        [{"text": r["prompt"] + r["completion"]} for r in rows],
        [{"text": r["prompt"] + r["completion"]} for r in rows[:2]],
    )["tracin"]
    assert (honest - leaky).abs().max() > 1e-3 * honest.abs().max()


def test_a_saved_classifier_is_scored_against_single_example_autograd(user_models: Any, tmp_path: Path) -> None:
    """Label names are read through the model's config; the last layer's dense blocks by name."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [
        {"text": "a fine day", "label": "positive"},
        {"text": "awful service, never again", "label": "negative"},
        {"text": "so so", "label": 1},
        {"text": "lovely", "label": "positive"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    block = "bert.encoder.layer.1.output.dense"
    out = tmp_path / "out"
    code = run(
        "--model",
        user_models.classifier,
        "--blocks",
        block,
        "--train",
        train,
        "--target",
        train,
        "--methods",
        "tracin",
        "--dtype",
        "float64",
        "--out",
        out,
    )
    assert code == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(user_models.classifier), dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(str(user_models.classifier))
    layer = dict(model.named_modules())[block]
    labels = [1, 0, 1, 1]
    grads = []
    for row, label in zip(rows, labels):
        logits = model(**tokenizer(row["text"], return_tensors="pt")).logits
        weight, bias = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([label])), [layer.weight, layer.bias])
        grads.append(torch.cat([weight, bias[:, None]], dim=1))  # the bias is one more input column
    v = torch.stack(grads).mean(0)
    expected = torch.tensor([-(v * g).sum() for g in grads])
    actual = torch.tensor(pd.read_parquet(out / "scores.parquet")["score"].to_numpy())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)


def test_unusable_rows_are_listed_not_dropped_and_truncation_is_counted(
    user_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"prompt": "Say a long thing:", "completion": " " + "word " * 40},
        {"prompt": "Empty", "completion": ""},
        {"prompt": "Fine", "completion": " yes"},
        {"prompt": None, "completion": " orphan"},
        {"prompt": "Again", "completion": " no"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    assert (
        run_lm(
            user_models,
            "--train",
            train,
            "--target",
            train,
            "--methods",
            "tracin",
            "--max-length",
            16,
            "--out",
            out,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "3 of 5 rows" in printed and "skipped 2" in printed
    assert "1 cut to the length limit (rows 0)" in printed
    table = pd.read_parquet(out / "scores.parquet")
    assert table["row"].tolist() == [0, 1, 2, 3, 4]
    assert table["score"].isna().tolist() == [False, True, False, True, False]
    assert table["skipped"].notna().tolist() == [False, True, False, True, False]
    recorded = json.loads((out / "arguments.json").read_text())["train"]
    assert sorted(recorded["skipped"]) == ["1", "3"] and recorded["truncated"] == [0]


def test_the_fit_is_reused_for_another_target_and_scores_as_a_fresh_one(
    user_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = ROWS["chat"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    first, second = write_jsonl(tmp_path / "a.jsonl", rows[:1]), write_jsonl(tmp_path / "b.jsonl", rows[2:])
    common = [
        "--model",
        user_models.llama,
        "--adapter",
        user_models.adapter,
        "--train",
        train,
        "--methods",
        "hyperinf,datainf",
        "--dtype",
        "float64",
    ]
    assert run(*common, "--target", first, "--out", tmp_path / "out") == 0
    assert "fitted and saved" in capsys.readouterr().out
    assert run(*common, "--target", second, "--out", tmp_path / "out") == 0
    assert "reused the fit" in capsys.readouterr().out
    assert run(*common, "--target", second, "--out", tmp_path / "fresh") == 0
    reused, fresh = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("out", "fresh"))
    for column in ("score_hyperinf", "score_datainf"):
        torch.testing.assert_close(torch.tensor(reused[column].to_numpy()), torch.tensor(fresh[column].to_numpy()))
    changed = write_jsonl(tmp_path / "train2.jsonl", rows[1:])
    assert run(*common[:4], "--train", changed, *common[6:], "--target", second, "--out", tmp_path / "out") == 0
    assert "fitted and saved" in capsys.readouterr().out


def test_queries_are_scored_as_text_for_a_causal_lm(user_models: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS["text"])
    out = tmp_path / "out"
    assert (
        run_lm(
            user_models,
            "--train",
            train,
            "--query",
            "The quick brown fox",
            "--query",
            "a stitch",
            "-k",
            2,
            "--out",
            out,
        )
        == 0
    )
    top = [json.loads(line) for line in (out / "top_k.jsonl").read_text().splitlines()]
    assert [t["text"] for t in top] == ["The quick brown fox", "a stitch"]
    assert all(len(t["proponents"]) == 2 and len(t["opponents"]) == 2 for t in top)
    assert top[0]["proponents"][0]["score"] <= top[0]["proponents"][1]["score"]


def errors(user_models: Any, tmp_path: Path) -> list[tuple[list[Any], str]]:
    """Command lines that must fail with one line naming the problem (and what it must say)."""
    pc = write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt-completion"])
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    empty_folder, config_only, base_only = tmp_path / "empty", tmp_path / "config-only", tmp_path / "base-only"
    empty_folder.mkdir()
    config_only.mkdir()
    (config_only / "config.json").write_text((user_models.llama / "config.json").read_text())
    base_only.mkdir()
    config = json.loads((user_models.llama / "config.json").read_text())
    (base_only / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
    (base_only / "model.safetensors").write_bytes((user_models.llama / "model.safetensors").read_bytes())
    lm = ["--model", user_models.llama, "--adapter", user_models.adapter]
    return [
        ([*lm, "--train", pc], "--target FILE or as --query"),
        (["--model", empty_folder, "--train", pc, "--target", pc], "has no config.json"),
        (["--model", config_only, "--train", pc, "--target", pc], "no weights"),
        (["--model", base_only, "--train", pc, "--target", pc], "LlamaModel"),
        (["--model", tmp_path / "missing", "--train", pc, "--target", pc], "does not exist"),
        (["--model", user_models.adapter, "--train", pc, "--target", pc], "is a peft adapter"),
        (
            ["--model", user_models.llama, "--adapter", user_models.other_adapter, "--train", pc, "--target", pc],
            "does not fit the model",
        ),
        (["--model", user_models.llama, "--adapter", pc.parent, "--train", pc, "--target", pc], "adapter_config.json"),
        (["--model", user_models.llama, "--train", pc, "--target", pc], "--blocks model.layers.1."),
        ([*lm, "--blocks", "model.layers.9", "--train", pc, "--target", pc], "no module named"),
        ([*lm, "--train", labelled, "--target", pc], "classification format but the model is a causal-lm"),
        ([*lm, "--train", odd, "--target", pc], "cannot tell the data format"),
        ([*lm, "--train", pc, "--target", pc, "--format", "chat"], "--format chat needs the columns messages"),
        ([*lm, "--train", pc, "--target", pc, "--max-length", 3], "row 0 of"),
        ([*lm, "--train", tmp_path / "nothing.jsonl", "--target", pc], "does not exist"),
    ]


def test_every_user_error_is_one_line_and_writes_nothing(
    user_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, says in errors(user_models, tmp_path):
        out = tmp_path / "out"
        assert run(*argv, "--out", out) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("hyperinf: error:") and "\n" not in err and says in err, (argv, err)
        assert not out.exists(), argv


def test_parquet_list_columns_score_as_their_json_lines_twin(user_models: Any, tmp_path: Path) -> None:
    """Chat messages read back from parquet are numpy arrays of dicts: the same scores as from JSON lines."""
    rows = ROWS["chat"]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    lm = ["--model", user_models.llama, "--adapter", user_models.adapter, "--methods", "tracin"]
    for name, train in (("p", tmp_path / "train.parquet"), ("j", jsonl)):
        assert run(*lm, "--train", train, "--target", jsonl, "--out", tmp_path / name) == 0
    parquet, lines = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("p", "j"))
    assert parquet["score"].tolist() == lines["score"].tolist()
    assert json.loads(parquet["messages"][1]) == rows[1]["messages"]


def test_a_fit_is_not_reused_for_another_base_model(user_models: Any, tmp_path: Path, capsys: Any) -> None:
    """The saved fit checks only the adapter's weights: the key holds the model folder too."""
    import shutil

    other = tmp_path / "other-llama"
    shutil.copytree(user_models.llama, other)
    train = write_jsonl(tmp_path / "train.jsonl", ROWS["text"])
    for model in (user_models.llama, other):
        assert run("--model", model, "--adapter", user_models.adapter, "--train", train, "--query", "Hello",
                   "--methods", "tracin", "--out", tmp_path / "out") == 0  # fmt: skip
        assert "fitted and saved" in capsys.readouterr().out
