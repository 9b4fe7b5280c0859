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


@pytest.mark.parametrize("layout", list(ROWS))
def test_scores_match_single_example_autograd_in_every_format(user_models: Any, tmp_path: Path, layout: str) -> None:
    """float64, 1e-6: a prompt token in the loss, a missed assistant turn or padding would all show."""
    rows = ROWS[layout]
    train, target = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "target.jsonl", rows[:2])
    out = tmp_path / "out"
    assert (
        run(
            "--model",
            user_models.llama,
            "--adapter",
            user_models.adapter,
            "--train",
            train,
            "--target",
            target,
            "--methods",
            "exact,tracin",
            "--dtype",
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
