"""A user's rows as token ids with the positions their loss is on: five data formats, detected or named.

=====================  =============================================  ==========================================
format                 columns (default names)                        loss on
=====================  =============================================  ==========================================
``classification``     ``text``, ``label``                            the label (a sequence classifier)
``prompt-completion``  ``prompt``, ``completion`` (TRL), or           the completion and an EOS
                       ``instruction``, ``input``, ``output`` (Alpaca)
``chat``               ``messages``: a list of ``{role, content}``    the assistant turns, as the tokenizer's
                                                                      chat template renders them
``multiple-choice``    ``question``, ``choices`` (a list),            the correct choice after
                       ``answer`` (its index or its text)             ``"Question: ...\\nAnswer:"``
``text``               ``text``                                       every token, and an EOS
=====================  =============================================  ==========================================

Every format but ``classification`` is for a causal LM. An Alpaca row's prompt is the
instruction, a blank line, its input if any and a blank line; a prompt and its completion are
tokenized apart and joined, so the completion's tokens are its own. Each example is cut to
``max_length`` tokens from the end; a cut row is counted in :attr:`Encoded.truncated`, and one
left with no scored token is an error naming the row. Rows that cannot be used (a missing or
empty field, an answer that is not one of the choices, a conversation without an assistant turn)
are kept out of the examples and listed with the reason in :attr:`Encoded.skipped`: the data is
the user's, nothing leaves silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hyperinf.errors import DataError, EmptyDataError
from hyperinf.hf.lm import IGNORE_INDEX

ModelKind = Literal["causal-lm", "classifier"]
FORMATS = ("classification", "prompt-completion", "chat", "multiple-choice", "text")
# The columns each format (and layout) reads, in the order formats are detected.
LAYOUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "chat": ("chat", ("messages",), ()),
    "multiple-choice": ("multiple-choice", ("question", "choices", "answer"), ()),
    "prompt-completion": ("prompt-completion", ("prompt", "completion"), ()),
    "alpaca": ("prompt-completion", ("instruction", "output"), ("input",)),
    "classification": ("classification", ("text", "label"), ()),
    "text": ("text", ("text",), ()),
}
ROLES = tuple(dict.fromkeys(role for _, needed, optional in LAYOUTS.values() for role in needed + optional))

Example = dict[str, Any]  # "input_ids" (list of ids), and "target_ids" (causal LM) or "labels" (classifier)


@dataclass
class Encoded:
    """Examples of the usable rows of a table, where each came from and what was left out or cut."""

    format: str
    layout: str
    columns: dict[str, str]  # role -> column read
    examples: list[Example]
    rows: list[int]  # each example's row position in the table (0-based)
    texts: list[str]  # each table row's fields as one text (every row, skipped ones too)
    skipped: dict[int, str] = field(default_factory=dict)  # row -> why it cannot be used
    truncated: list[int] = field(default_factory=list)  # rows cut to max_length

    def summary(self, name: str) -> str:
        """One line: how many rows of ``name`` became examples, which were skipped and why, how many were cut."""
        line = f"{name}: {len(self.examples)} of {len(self.texts)} rows as {self.format} examples"
        if self.skipped:
            grouped = rows_by_reason(self.skipped).items()
            listed = "; ".join(f"rows {listed_rows(rows)} ({reason})" for reason, rows in grouped)
            line += f"; skipped {len(self.skipped)}: {listed}"
        if self.truncated:
            line += f"; {len(self.truncated)} cut to the length limit (rows {listed_rows(self.truncated)})"
        return line


def rows_by_reason(skipped: Mapping[int, str]) -> dict[str, list[int]]:
    """The skipped rows grouped by why, each group in row order."""
    grouped: dict[str, list[int]] = {}
    for row, reason in skipped.items():
        grouped.setdefault(reason, []).append(row)
    return grouped


def listed_rows(rows: Sequence[int], most: int = 10) -> str:
    """``rows`` comma-separated: the first ``most`` and how many more."""
    shown = ", ".join(map(str, rows[:most]))
    return shown + (f" and {len(rows) - most} more" if len(rows) > most else "")


def detect_layout(columns: Sequence[str], names: Mapping[str, str] | None = None) -> str:
    """The first layout of :data:`LAYOUTS` whose columns (renamed by ``names``: role -> column) are all present."""
    names = dict(names or {})
    present = set(map(str, columns))
    for layout, (_, needed, _) in LAYOUTS.items():
        if all(names.get(role, role) in present for role in needed):
            return layout
    known = "; ".join(f"{fmt}: {', '.join(needed)}" for fmt, (_, needed, _) in LAYOUTS.items())
    raise DataError(
        f"cannot tell the data format from the columns {', '.join(sorted(present)) or '(none)'} (formats and their "
        f"columns: {known}): rename the columns, or map them with --columns role=column (e.g. prompt=question)"
    )


def layout_of(format: str | None, columns: Sequence[str], names: Mapping[str, str] | None = None) -> str:
    """The layout to read: detected, or checked against the named ``format``."""
    if format is None:
        return detect_layout(columns, names)
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}: use one of {', '.join(FORMATS)}")
    names = dict(names or {})
    candidates = [layout for layout, (fmt, _, _) in LAYOUTS.items() if fmt == format]
    for layout in candidates:
        if all(names.get(role, role) in set(map(str, columns)) for role in LAYOUTS[layout][1]):
            return layout
    needed = " or ".join(", ".join(names.get(r, r) for r in LAYOUTS[c][1]) for c in candidates)
    raise DataError(
        f"--format {format} needs the columns {needed}, but the data has {', '.join(map(str, columns))}: "
        "map yours with --columns role=column"
    )


def encode(
    frame: Any,
    tokenizer: Any,
    kind: ModelKind,
    *,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
    max_length: int = 512,
    label2id: Mapping[str, int] | None = None,
    name: str = "the data",
) -> Encoded:
    """The examples of the rows of ``frame`` (a DataFrame, :func:`hyperinf.hf.tables.read_table`) for a model of ``kind``.

    ``columns`` maps a role (``prompt``, ``messages``, ...) to the column holding it; ``label2id``
    turns a classifier's label names into ids (integer labels are ids already); ``name`` names
    the data in errors (e.g. the file).
    """
    names = {role: column for role, column in (columns or {}).items()}
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        raise DataError(f"unknown column role(s) {', '.join(unknown)} in --columns: the roles are {', '.join(ROLES)}")
    if max_length < 2:
        raise DataError(f"--max-length {max_length}: an example needs at least 2 tokens")
    layout = layout_of(format, list(frame.columns), names)
    fmt, needed, optional = LAYOUTS[layout]
    if (fmt == "classification") != (kind == "classifier"):
        fix = (
            "a sequence classifier reads (text, label) rows"
            if kind == "classifier"
            else "for a causal LM write them as prompt / completion, or pass --format text to model the text alone"
        )
        raise DataError(f"{name} is in the {fmt} format but the model is a {kind}: {fix}")
    if len(frame) == 0:
        raise EmptyDataError(f"{name} has no rows: give a file with at least one {fmt} row")
    used = {role: names.get(role, role) for role in needed + optional if names.get(role, role) in frame.columns}
    encoder = _ENCODERS[layout]
    encoded = Encoded(fmt, layout, used, [], [], [])
    for row, record in enumerate(frame[list(used.values())].to_dict("records")):
        values = {role: plain_value(record[column]) for role, column in used.items()}
        encoded.texts.append(_display(layout, values))
        missing = [used[role] for role in needed if _blank(values[role])]
        if missing:
            encoded.skipped[row] = f"empty {', '.join(missing)}"
            continue
        try:
            example = encoder(tokenizer, values, label2id)
        except _Unusable as reason:
            encoded.skipped[row] = str(reason)
            continue
        if len(example["input_ids"]) > max_length:
            encoded.truncated.append(row)
            example = _cut(example, max_length)
            if "target_ids" in example and all(t == IGNORE_INDEX for t in example["target_ids"][1:]):
                raise DataError(
                    f"row {row} of {name} keeps no scored token within --max-length {max_length} (its prompt fills "
                    "them all): raise --max-length or shorten that row's prompt"
                )
        encoded.examples.append(example)
        encoded.rows.append(row)
    if not encoded.examples:
        raise EmptyDataError(f"no row of {name} can be used: {encoded.summary(name)}")
    return encoded


def _cut(example: Example, max_length: int) -> Example:
    """The first ``max_length`` tokens; a classifier's row keeps its last token too (the tokenizer's closing
    special token, e.g. ``[SEP]``, as the tokenizer's own truncation keeps it)."""
    if "labels" in example:
        ids = example["input_ids"]
        return {**example, "input_ids": ids[: max_length - 1] + ids[-1:]}
    return {k: v[:max_length] if isinstance(v, list) else v for k, v in example.items()}


class _Unusable(Exception):
    """A row that cannot become an example; the message says why."""


def plain_value(cell: Any) -> Any:
    """A cell as plain Python: lists from numpy arrays (parquet, datasets), None for a missing value (None,
    NaN, pandas' NA)."""
    if hasattr(cell, "tolist") and not isinstance(cell, str):
        cell = cell.tolist()
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or type(cell).__name__ in ("NAType", "NaTType"):
        return None
    return cell


def plain_rows(frame: Any, rows: Sequence[int]) -> list[dict[str, Any]]:
    """Rows ``rows`` (positions) of a table as read, each a dict of plain values (:func:`plain_value`) under its
    column names as text: the rows a selection or a test set holds, as they can be written back out."""
    return [{str(k): plain_value(v) for k, v in record.items()} for record in frame.iloc[list(rows)].to_dict("records")]


def table_column(values: list[Any]) -> list[Any]:
    """A column a parquet file can hold: plain values, lists and dicts as JSON text, and every value as text
    when the types mix (an answer given as an index in one row and as a choice's text in another)."""
    cells = [field_text(plain_value(v)) for v in values]
    kinds = {type(v) for v in cells if v is not None}
    return [None if v is None else str(v) for v in cells] if len(kinds) > 1 else cells


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _prompt_completion(tokenizer: Any, prompt: str, completion: list[int]) -> Example:
    ids = _ids(tokenizer, prompt, special=True)
    return {"input_ids": ids + completion, "target_ids": [IGNORE_INDEX] * len(ids) + completion}


def _completion(tokenizer: Any, values: dict[str, Any], _: Any) -> Example:
    return _prompt_completion(
        tokenizer, str(values["prompt"]), _ids(tokenizer, str(values["completion"])) + _eos(tokenizer)
    )


def alpaca_prompt(instruction: str, input: str | None) -> str:
    """An Alpaca row's prompt: the instruction, a blank line, the input (when there is one) and a blank line."""
    parts = [instruction.strip()] + ([input.strip()] if input and input.strip() else [])
    return "\n\n".join(parts) + "\n\n"


def _alpaca(tokenizer: Any, values: dict[str, Any], _: Any) -> Example:
    prompt = alpaca_prompt(str(values["instruction"]), values.get("input"))
    return _prompt_completion(tokenizer, prompt, _ids(tokenizer, str(values["output"])) + _eos(tokenizer))


def _text(tokenizer: Any, values: dict[str, Any], _: Any) -> Example:
    ids = _ids(tokenizer, str(values["text"]), special=True) + _eos(tokenizer)
    if len(ids) < 2:
        raise _Unusable("one token: nothing to predict")
    return {"input_ids": ids, "target_ids": [IGNORE_INDEX] + ids[1:]}


def question_prompt(question: str) -> str:
    """A multiple-choice question as a prompt; each choice follows it after a space."""
    return f"Question: {question.strip()}\nAnswer:"


def answer_index(values: Mapping[str, Any]) -> int:
    """The position of a multiple-choice row's answer among its choices (the answer is an index or a choice's text)."""
    choices, answer = values["choices"], values["answer"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise _Unusable("choices is not a list of at least two")
    if isinstance(answer, str) and answer in [str(c) for c in choices]:
        return [str(c) for c in choices].index(answer)
    try:
        index = int(answer)
    except (TypeError, ValueError):
        raise _Unusable("answer is neither one of the choices nor an index") from None
    if index != answer and str(index) != str(answer).strip():
        raise _Unusable("answer is neither one of the choices nor an index")
    if not 0 <= index < len(choices):
        raise _Unusable(f"answer index {index} is not in 0..{len(choices) - 1}")
    return index


def _multiple_choice(tokenizer: Any, values: dict[str, Any], _: Any) -> Example:
    choice = values["choices"][answer_index(values)]
    return _prompt_completion(tokenizer, question_prompt(str(values["question"])), _ids(tokenizer, " " + str(choice)))


def encode_choices(tokenizer: Any, values: Mapping[str, Any]) -> list[Example]:
    """One example per choice of a multiple-choice row, the choice as the scored completion (no EOS: every
    option is scored on its own tokens, as lm-eval-harness does)."""
    prompt = question_prompt(str(values["question"]))
    return [_prompt_completion(tokenizer, prompt, _ids(tokenizer, " " + str(c))) for c in values["choices"]]


def _chat(tokenizer: Any, values: dict[str, Any], _: Any) -> Example:
    messages = values["messages"]
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise _Unusable("messages is not a list of {role, content}")
    if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in messages):
        raise _Unusable("no assistant turn")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "chat rows need the tokenizer's chat template, and this tokenizer has none: set tokenizer.chat_template "
            "(or save the model's tokenizer with it), or write the rows as prompt / completion"
        )
    full = _render(tokenizer, messages, False)
    ids: list[int] = []
    targets: list[int] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        start, end = len(before), len(through)
        if not (done <= start <= end and full.startswith(through) and through.startswith(before)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation's first turns as the start of the whole "
                "(so the assistant's tokens cannot be told apart): write the rows as prompt / completion"
            )
        context, answer = _ids(tokenizer, full[done:start]), _ids(tokenizer, full[start:end])
        ids += context + answer
        targets += [IGNORE_INDEX] * len(context) + answer
        done = end
    tail = _ids(tokenizer, full[done:])
    return {"input_ids": ids + tail, "target_ids": targets + [IGNORE_INDEX] * len(tail)}


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja2's TemplateError and the template's own raise_exception calls
        raise _Unusable(
            f"the chat template refuses it: {str(error).splitlines()[0] if str(error) else error}"
        ) from None
    return str(text)


def _classification(tokenizer: Any, values: dict[str, Any], label2id: Mapping[str, int] | None) -> Example:
    label = values["label"]
    names = dict(label2id or {})
    if str(label) in names:
        index = names[str(label)]
    else:
        try:
            index = int(label)
        except (TypeError, ValueError):
            raise _Unusable(f"label {label!r} is not one of the model's labels ({', '.join(names)})") from None
        if index != label and str(index) != str(label).strip():
            raise _Unusable(f"label {label!r} is not one of the model's labels ({', '.join(names)})")
        if names and index not in names.values():
            raise _Unusable(f"label {index} is not one of the model's label ids {sorted(names.values())}")
    return {"input_ids": _ids(tokenizer, str(values["text"]), special=True), "labels": index}


def _display(layout: str, fields: Mapping[str, Any]) -> str:
    """A row as one text for people (the top-k lists); a missing field shows as nothing."""
    values = {role: "" if value is None else value for role, value in fields.items()}
    if layout == "chat":
        messages = values["messages"] if isinstance(values["messages"], list) else []
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages if isinstance(m, dict))
    if layout == "multiple-choice":
        return f"{values['question']} -> {_chosen(values)}"
    if layout == "prompt-completion":
        return f"{values['prompt']}{values['completion']}"
    if layout == "alpaca":
        return alpaca_prompt(str(values["instruction"]), values.get("input")) + str(values["output"])
    return str(values["text"])


def _chosen(values: Mapping[str, Any]) -> str:
    try:
        return str(values["choices"][answer_index(values)])
    except (_Unusable, TypeError):
        return str(values["answer"])


def field_text(value: Any) -> Any:
    """A cell as parquet can hold it in a text column: lists and dicts as JSON."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


_ENCODERS: dict[str, Callable[[Any, dict[str, Any], Any], Example]] = {
    "chat": _chat,
    "multiple-choice": _multiple_choice,
    "prompt-completion": _completion,
    "alpaca": _alpaca,
    "classification": _classification,
    "text": _text,
}


def collator(tokenizer: Any) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """A ``DataLoader`` ``collate_fn`` over examples: right-padded ``input_ids`` and ``attention_mask``, then
    ``target_ids`` (``-100`` on padding) or ``labels``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")

    def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max((len(e["input_ids"]) for e in examples), default=0)
        batch = {
            "input_ids": torch.full((len(examples), width), pad, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        }
        if examples and "target_ids" in examples[0]:
            batch["target_ids"] = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
            batch["attention_mask"][i, :n] = 1
            if "target_ids" in batch:
                batch["target_ids"][i, :n] = torch.tensor(example["target_ids"], dtype=torch.long)
        if examples and "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch

    return collate
