"""Tests for posttrain.records: parsing the three data formats and every error message."""

from __future__ import annotations

import json

import pytest

from posttrain import records
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


@pytest.mark.parametrize("answer,text", [(3.5, "3.5"), (-0.25, "-0.25"), (1e20, "100000000000000000000"), (-7, "-7")])
def test_prompts_accept_float_answers_as_their_text(tmp_path, answer, text):
    assert read_prompts(write(tmp_path, {"prompt": "p", "answer": answer}))[0].answer == text


@pytest.mark.parametrize("answer", ["NaN", "Infinity", "-Infinity"])
def test_prompts_reject_non_finite_numbers(tmp_path, answer):
    path = write(tmp_path, '{"prompt": "p", "answer": ' + answer + '}')
    assert error(read_prompts, path).startswith(f"{path}:1: field 'answer' must be a finite number")


@pytest.mark.parametrize("answer,got", [(True, "bool"), (None, "null"), ([4], "list")])
def test_prompts_reject_other_answer_types(tmp_path, answer, got):
    path = write(tmp_path, {"prompt": "p", "answer": answer})
    assert error(read_prompts, path) == f"{path}:1: field 'answer' must be a string, got {got}"


def test_prompts_missing_answer(tmp_path):
    path = write(tmp_path, {"prompt": "p"})
    assert error(read_prompts, path) == (
        f"{path}:1: missing field 'answer' (expected the prompt in 'prompt', a string, and the answer in 'answer', a string or number)")


GSM8K = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72", "source": "gsm8k"}


def test_a_missing_prompt_hints_at_the_field_the_record_has(tmp_path):
    path = write(tmp_path, GSM8K)
    assert error(read_prompts, path) == (f"{path}:1: missing field 'prompt' (expected the prompt in 'prompt', a string, "
                                         "and the answer in 'answer', a string or number; this record has "
                                         "'question': give prompt_field=question)")


def test_field_mapping_reads_other_names_and_keeps_the_other_columns(tmp_path):
    path = write(tmp_path, GSM8K, {"question": "q2", "answer": 5, "source": "mine", "level": 2})
    records = read_prompts(path, prompt_field="question")
    assert [(r.prompt, r.answer) for r in records] == [(GSM8K["question"], GSM8K["answer"]), ("q2", "5")]
    assert records[1].columns == {"source": "mine", "level": 2}
    renamed = write(tmp_path, {"q": "p", "gold": 4}, name="renamed.jsonl")
    assert read_prompts(renamed, prompt_field="q", answer_field="gold") == [PromptRecord("p", "4")]
    assert error(lambda p: read_prompts(p, answer_field="gold"), renamed) == (
        f"{renamed}:1: missing field 'prompt' (expected the prompt in 'prompt', a string, and the answer in 'gold', a string or number)")


def one_line_error(reader, path):
    """The UserError's message, checked to be one line naming the file."""
    message = error(reader, path)
    assert "\n" not in message and str(path) in message
    return message


def test_deep_nesting_is_one_line(tmp_path):
    path = write(tmp_path, '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}')
    assert one_line_error(read_prompts, path).startswith(f"{path}:1: JSON nested too deeply")


def test_a_lone_surrogate_is_refused_at_read_time(tmp_path):
    path = write(tmp_path, {"prompt": "ok", "answer": "1"}, '{"prompt": "bad \\ud800 text", "answer": "1"}')
    assert one_line_error(read_prompts, path).startswith(f"{path}:2: field 'prompt' holds an unpaired surrogate")
    sft = write(tmp_path, '{"messages": [{"role": "user", "content": "\\udfff"}, '
                          '{"role": "assistant", "content": "x"}]}', name="sft.jsonl")
    assert one_line_error(read_sft, sft).startswith(f"{sft}:1: field 'messages[0].content' holds an unpaired")


def test_a_line_over_the_limit_is_refused_with_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    path = write(tmp_path, {"prompt": "x" * 2000, "answer": "1"})
    message = one_line_error(read_prompts, path)
    assert message.startswith(f"{path}:1: line longer than") and "MAX_LINE_BYTES" in message
    fits = write(tmp_path, {"prompt": "x" * (1000 - 30), "answer": "1"}, name="fits.jsonl")
    assert len(read_prompts(fits)) == 1


def test_an_integer_too_long_to_convert_is_one_line(tmp_path):
    path = write(tmp_path, '{"prompt": "p", "answer": ' + "9" * 5000 + "}")
    assert one_line_error(read_prompts, path).startswith(f"{path}:1: invalid JSON")


@pytest.mark.parametrize("special", ["/proc/self/mem", "/dev/zero"])
def test_files_that_are_not_data_are_one_line(special, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 4096)  # /dev/zero: one endless line
    assert one_line_error(read_prompts, special).startswith(f"{special}:1: ")


def test_a_folder_that_is_not_a_dataset_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a dataset saved with `save_to_disk`" in one_line_error(read_prompts, tmp_path)


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
