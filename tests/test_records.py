"""Tests for posttrain.records: parsing the three data formats and every error message."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import UserError
from posttrain.records import (
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    read_jsonl,
    read_preferences,
    read_prompts,
    read_sft,
)


def write(tmp_path, *lines, name="data.jsonl"):
    """Write lines (dicts are JSON-encoded, strings written verbatim) and return the path."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def error(reader, path):
    with pytest.raises(UserError) as info:
        reader(path)
    return str(info.value)


def test_read_jsonl_skips_blank_lines_and_counts_lines(tmp_path):
    path = write(tmp_path, {"a": 1}, "", "   ", {"b": 2})
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_read_jsonl_accepts_utf8_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": "\xc3\xa9"}\n')
    assert list(read_jsonl(path)) == [(1, {"a": "é"})]


def test_invalid_json(tmp_path):
    path = write(tmp_path, {"prompt": "p", "completion": "c"}, '{"prompt": ')
    assert error(read_sft, path).startswith(f"{path}:2: invalid JSON (")


def test_invalid_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "\xff"}\n')
    assert error(read_sft, str(path)) == f"{path}:1: not valid UTF-8 text"


def test_non_object_line(tmp_path):
    path = write(tmp_path, "[1, 2]")
    assert error(read_sft, path) == f"{path}:1: expected a JSON object, got list"


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    assert error(read_sft, path) == f"data file not found: {path}"


def test_no_records(tmp_path):
    path = write(tmp_path, "", "")
    assert error(read_preferences, path) == (
        f"{path}: no records (expected lines or rows with 'prompt', 'chosen' and 'rejected' strings)")


def test_sft_prompt_completion(tmp_path):
    path = write(tmp_path, {"prompt": "2+2?", "completion": "4", "extra": [1]})
    assert read_sft(path) == [SFTRecord(prompt="2+2?", completion="4", messages=None)]


def test_sft_messages(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    path = write(tmp_path, {"messages": messages}, {"prompt": "p", "completion": "c"})
    assert read_sft(path) == [
        SFTRecord(prompt=None, completion="Hello", messages=(("system", "Be brief."), ("user", "Hi"))),
        SFTRecord(prompt="p", completion="c"),
    ]


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "p"}, "data.jsonl:1: missing field 'completion' "
                      "(expected 'prompt' and 'completion' strings, or 'messages')"),
    ({"prompt": 3, "completion": "c"}, "data.jsonl:1: field 'prompt' must be a string, got int"),
    ({"prompt": "p", "completion": None}, "data.jsonl:1: field 'completion' must be a string, got null"),
    ({"prompt": "p", "completion": "  "}, "data.jsonl:1: field 'completion' is empty"),
    ({"messages": "hi"}, "data.jsonl:1: field 'messages' must be a list"),
    ({"messages": ["hi"]},
     "data.jsonl:1: field 'messages[0]' must be an object with 'role' and 'content', got str"),
    ({"messages": [{"role": "user"}]}, "data.jsonl:1: missing field 'messages[0].content' (expected 'role' and"),
    ({"messages": [{"role": "bot", "content": "x"}]},
     "data.jsonl:1: field 'messages[0].role' must be one of system, user, assistant, got 'bot'"),
    ({"messages": [{"role": "user", "content": 5}]},
     "data.jsonl:1: field 'messages[0].content' must be a string, got int"),
    ({"messages": [{"role": "user", "content": "x"}]}, "data.jsonl:1: field 'messages' must end with an 'assistant'"),
    ({"messages": []}, "data.jsonl:1: field 'messages' must end with an 'assistant'"),
    ({"messages": [{"role": "assistant", "content": "x"}]},
     "data.jsonl:1: field 'messages' needs at least one message"),
])
def test_sft_errors(tmp_path, record, expected):
    path = write(tmp_path, record)
    assert error(read_sft, path).startswith(str(tmp_path / expected))


def test_errors_name_the_right_line(tmp_path):
    path = write(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"}, "", {"prompt": "p", "chosen": 1})
    assert error(read_preferences, path) == f"{path}:3: field 'chosen' must be a string, got int"


def test_preferences(tmp_path):
    path = write(tmp_path, {"prompt": "p", "chosen": "good", "rejected": "bad"})
    assert read_preferences(path) == [PreferenceRecord(prompt="p", chosen="good", rejected="bad")]


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "p", "chosen": "a"},
     ":1: missing field 'rejected' (expected 'prompt', 'chosen' and 'rejected' strings)"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, ":1: field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, ":1: field 'rejected' is identical to 'chosen'"),
])
def test_preference_errors(tmp_path, record, expected):
    path = write(tmp_path, record, name="prefs.jsonl")
    assert error(read_preferences, path).startswith(path + expected)


def test_prompts_accept_int_answer(tmp_path):
    path = write(tmp_path, {"prompt": "2+2?", "answer": 4}, {"prompt": "name?", "answer": "Ada"})
    assert read_prompts(path) == [PromptRecord("2+2?", "4"), PromptRecord("name?", "Ada")]


@pytest.mark.parametrize("answer,got", [(1.5, "float"), (True, "bool"), (None, "null"), ([4], "list")])
def test_prompts_reject_other_answer_types(tmp_path, answer, got):
    path = write(tmp_path, {"prompt": "p", "answer": answer})
    assert error(read_prompts, path) == f"{path}:1: field 'answer' must be a string, got {got}"


def test_prompts_missing_answer(tmp_path):
    path = write(tmp_path, {"prompt": "p"})
    assert error(read_prompts, path) == (
        f"{path}:1: missing field 'answer' (expected a 'prompt' string and an 'answer' string or integer)")


ROWS = [{"prompt": "Q: 1+2\n", "completion": "A: 3"},
        {"messages": [{"role": "user", "content": "Q: 2+2"}, {"role": "assistant", "content": "A: 4"}]}]


def test_parquet_and_saved_datasets_read_as_their_jsonl_twin(tmp_path):
    """The hub's storage format and `save_to_disk` folders: the same records as the JSONL file (messages, a
    list of structs in Arrow, included)."""
    datasets = pytest.importorskip("datasets")
    from_jsonl = read_sft(write(tmp_path, *ROWS))
    table = datasets.Dataset.from_list([{"prompt": "Q: 1+2\n", "completion": "A: 3", "messages": None},
                                        {"prompt": None, "completion": None, "messages": ROWS[1]["messages"]}])
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "splits"))
    for source in ("data.parquet", "saved", "splits"):
        assert read_sft(tmp_path / source) == from_jsonl, source


def test_parquet_and_dataset_errors_name_the_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"},
                                       {"prompt": "p", "chosen": "a", "rejected": None}])
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    assert error(read_preferences, tmp_path / "pairs.parquet").startswith(
        f"{tmp_path / 'pairs.parquet'}:2: missing field 'rejected'")  # a null in a table is a missing field
    datasets.DatasetDict({"validation": rows}).save_to_disk(str(tmp_path / "no-train"))
    assert "holds the splits validation and no 'train'" in error(read_preferences, tmp_path / "no-train")
    (tmp_path / "plain").mkdir()
    assert "not a dataset saved with `save_to_disk`" in error(read_preferences, tmp_path / "plain")
    (tmp_path / "broken.parquet").write_text("not parquet")
    assert "not a readable Parquet file" in error(read_preferences, tmp_path / "broken.parquet")
    assert error(read_sft, tmp_path / "missing.parquet") == f"data file not found: {tmp_path / 'missing.parquet'}"
