"""hyperinf.results: JSON-lines records stay one per line for every line reader."""

from __future__ import annotations

import json
from pathlib import Path

from hyperinf.results import json_line, write_jsonl


def test_json_lines_survive_readers_that_split_on_unicode_line_separators(tmp_path: Path) -> None:
    records = [{"text": "one\u2028two\u2029three\x85four", "score": -1.5}, {"text": "café 日本", "score": 2}]
    write_jsonl(tmp_path / "out.jsonl", records)
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line) for line in text.splitlines()] == records  # str.splitlines splits at U+2028
    assert "café 日本" in text and json_line({"a": 1}) == '{"a": 1}\n'
