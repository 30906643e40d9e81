"""Seeded malformed JSONL fed to every record reader: each file is read or refused with a UserError, never
anything else (no RecursionError, TypeError, KeyError, UnicodeError or ValueError from deep inside)."""
import functools
import json
import random

import pytest

from posttrain import records
from posttrain.errors import UserError
from posttrain.records import read_preferences, read_prompts, read_sft

READERS = {"prompts": read_prompts, "sft": read_sft, "preferences": read_preferences,
           "mapped prompts": functools.partial(read_prompts, prompt_field="question", answer_field="solution")}
FIELDS = ("prompt", "answer", "completion", "chosen", "rejected", "messages", "question", "solution", "role",
          "content")
LINE_LIMIT = 64 * 1024  # MAX_LINE_BYTES while fuzzing, so that "huge" lines stay cheap
CASES = 300


def scalar(rng: random.Random):
    return rng.choice([None, True, False, 0, -1, 3.5, 10**30, 1e308, "", "  ", "x", "42", "#### 7",
                       "\u00e9\u4e2d\U0001f600", "\x00", rng.random(), rng.randint(-10**6, 10**6)])


def value(rng: random.Random, depth: int = 0):
    """A random JSON value, mostly shallow."""
    kind = rng.random()
    if depth > 3 or kind < 0.5:
        return scalar(rng)
    if kind < 0.75:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(FIELDS): value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def message(rng: random.Random):
    if rng.random() < 0.2:
        return value(rng)
    return {"role": rng.choice(["user", "assistant", "system", "tool", 3, None]), "content": value(rng)}


def plausible_record(rng: random.Random) -> dict:
    """A record of one of the formats, then damaged: fields dropped, retyped or renamed."""
    record = rng.choice([
        {"prompt": "Q: 1+1", "answer": "2"},
        {"question": "Q: 1+1", "solution": "1+1=2\n#### 2"},
        {"prompt": "Q", "completion": "A"},
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])
    for key in list(record):
        roll = rng.random()
        if roll < 0.25:
            del record[key]
        elif roll < 0.5:
            record[key] = [message(rng) for _ in range(rng.randint(0, 3))] if key == "messages" else value(rng)
    if rng.random() < 0.3:
        record[rng.choice(FIELDS)] = value(rng)
    return record


def line(rng: random.Random) -> bytes:
    """One line of a malformed file: damaged records, deep nesting, surrogates, huge lines, binary garbage."""
    kind = rng.choice(["record", "record", "record", "nested", "surrogate", "huge", "binary", "truncated",
                       "not an object", "non-finite", "long integer"])
    if kind == "record":
        return json.dumps(plausible_record(rng)).encode()
    if kind == "nested":
        depth = rng.choice([50, 999, 1001, 5000])  # about the JSON decoder's recursion limit, and past it
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        return f'{{"prompt": {opener * depth}1{closer * depth}, "answer": "1"}}'.encode()
    if kind == "surrogate":
        field = rng.choice(["prompt", "answer", "completion", "chosen", "question"])
        text = rng.choice(["\\ud800", "x\\udfff", "\\udbff\\udbff", "ok \\ud83d"])
        return json.dumps({"prompt": "p", "answer": "1", "completion": "c", "chosen": "a", "rejected": "b",
                           "question": "q", "solution": "s"}).replace(f'"{field}": "', f'"{field}": "{text}', 1).encode()
    if kind == "huge":
        return json.dumps({"prompt": "x" * rng.randint(LINE_LIMIT - 64, 3 * LINE_LIMIT), "answer": "1"}).encode()
    if kind == "binary":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).replace(b"\n", b"")
    if kind == "truncated":
        text = json.dumps(plausible_record(rng))
        return text[: rng.randint(0, len(text) - 1)].encode()
    if kind == "not an object":
        return json.dumps(value(rng)).encode() if rng.random() < 0.5 else b"[1, 2]"
    if kind == "non-finite":
        return rng.choice([b'{"prompt": "p", "answer": NaN}', b'{"prompt": "p", "answer": -Infinity}'])
    return b'{"prompt": "p", "answer": ' + b"7" * rng.randint(4000, 6000) + b"}"


@pytest.fixture(scope="module")
def fuzzed_files(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(1234)
    paths = []
    for i in range(CASES):
        lines = [line(rng) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.2:  # a valid record first: the damage is on a later line
            lines.insert(0, b'{"prompt": "Q", "answer": "1", "completion": "c", "chosen": "a", "rejected": "b"}')
        path = folder / f"case{i}.jsonl"
        path.write_bytes(b"\n".join(lines) + rng.choice([b"\n", b""]))
        paths.append(path)
    return paths


@pytest.mark.parametrize("reader", READERS)
def test_every_malformed_file_is_read_or_refused_in_one_line(fuzzed_files, reader, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", LINE_LIMIT)
    outcomes = {"read": 0, "refused": 0}
    for path in fuzzed_files:
        try:
            READERS[reader](path)
            outcomes["read"] += 1
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message and str(path) in message, (path, message)
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - anything but a UserError is the failure looked for
            pytest.fail(f"{reader} raised {type(exc).__name__} on {path}: {exc}\n{path.read_bytes()[:300]!r}")
    assert outcomes["refused"] > CASES // 2  # the generator does damage most files

