"""Read the user's training data into typed records, with precise error messages.

Data comes from the user (`--data`): a JSONL file, a Parquet file (what the Hugging Face hub stores
datasets as), or a folder written by `datasets`' `save_to_disk`. Every problem becomes one
`UserError` naming the file, the line (a Parquet file's or dataset's row, counted from 1), the field
and what was expected, instead of a KeyError deep inside a training loop. Extra fields are ignored.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from posttrain.errors import UserError, where

R = TypeVar("R")
PathLike = str | os.PathLike[str]
At = Callable[..., str]  # `where` bound to one file and line: at() -> "f:3", at("x") -> "f:3: field 'x'"

ROLES = ("system", "user", "assistant")
# What each format expects, quoted in error messages.
_SFT_EXPECTED = "'prompt' and 'completion' strings, or 'messages'"
_MESSAGE_EXPECTED = "'role' and 'content' strings"
_PREFERENCE_EXPECTED = "'prompt', 'chosen' and 'rejected' strings"
_UNPAIRED_EXPECTED = "'prompt' and 'completion' strings and 'label' true or false"
_CONVERSATION_EXPECTED = "'chosen' and 'rejected' lists of {'role', 'content'} messages, 'prompt' a list or left out"
_PROMPT_EXPECTED = "the prompt in {prompt!r}, a string, and the answer in {answer!r}, a string or number"
# The longest JSONL line read (bytes). A record this long is far past any model's context, so a longer
# line is a file that is not JSONL (a binary file, a device, a dump on one line) rather than data.
MAX_LINE_BYTES = 16 * 2**20
# Fields that, in public datasets, hold what posttrain calls the prompt or the answer: hinted at when missing.
PROMPT_ALIASES = ("question", "problem", "query", "input", "instruction")
ANSWER_ALIASES = ("solution", "final_answer", "target", "output", "label", "response")


@dataclass(frozen=True)
class SFTRecord:
    """One supervised example: a prompt and the completion to learn.

    Given as `{"prompt", "completion"}`, `prompt` is the text and `messages`
    is None. Given as `{"messages": [...]}` (chat format), the final assistant
    message is the `completion`, `messages` holds the earlier turns as
    `(role, content)` pairs, and `prompt` is None; rendering them with the
    tokenizer's chat template happens elsewhere.
    """

    prompt: str | None
    completion: str
    messages: Messages | None = None


Messages = tuple[tuple[str, str], ...]  # chat turns as (role, content) pairs


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) completion.

    Given as strings, `prompt` is the text. Given in TRL's conversational format (message lists),
    `prompt` holds the turns before the reply as `(role, content)` pairs, rendered with the
    tokenizer's chat template elsewhere (`data.encode_prompt`), and `chosen`/`rejected` are the
    contents of the two final assistant replies.
    """

    prompt: str | Messages
    chosen: str
    rejected: str


@dataclass(frozen=True)
class UnpairedRecord:
    """A prompt with one completion labelled desirable (`label` true) or undesirable: KTO's data, TRL's
    unpaired preference format."""

    prompt: str
    completion: str
    label: bool


@dataclass(frozen=True)
class PromptRecord:
    """A prompt whose sampled completions are scored by comparing their extracted answer to `answer`;
    `columns` holds the record's other fields (a user's reward function receives them)."""

    prompt: str
    answer: str
    columns: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def read_rows(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(number, object)` for each record of `path`: a JSONL file's non-blank lines, a Parquet file's
    rows or those of a folder saved by `datasets` (a DatasetDict's `train` split), numbered from 1. A table
    has every column in every row, so there a null field counts as absent (a chat row's null prompt)."""
    path = Path(path)
    if not (path.is_dir() or path.suffix == ".parquet"):
        yield from read_jsonl(path)
        return
    rows = _saved_dataset(path) if path.is_dir() else _parquet_rows(path)
    for number, row in enumerate(rows, 1):
        yield number, {key: value for key, value in row.items() if value is not None}


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow (pip install pyarrow), or give the data as JSONL") from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except (OSError, pyarrow.ArrowException) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None


def _saved_dataset(path: Path):
    """The rows of a folder written by `Dataset.save_to_disk` (or a DatasetDict's `train` split)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a folder: reading a saved dataset needs `datasets` (pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is a folder but not a dataset saved with `save_to_disk`; give --data a JSONL or "
                        "Parquet file, or such a folder") from None
    except (OSError, ValueError) as exc:  # unreadable, or a damaged dataset folder
        raise UserError(f"{path}: not a readable saved dataset ({_one_line(exc)}); give --data a JSONL or "
                        "Parquet file, or a folder written by `save_to_disk`") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{path} holds the splits {', '.join(loaded)} and no 'train'; give --data one split's "
                            f"folder ({path / next(iter(loaded))})")
        loaded = loaded["train"]
    return loaded


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line number, object)` for each non-blank line of a JSONL file."""
    try:
        f = open(path, "rb")  # bytes: json.loads then decodes (and skips a UTF-8 BOM) per line
    except FileNotFoundError:
        raise UserError(f"data file not found: {os.fspath(path)}") from None
    except OSError as exc:
        raise UserError(f"cannot read data file {os.fspath(path)}: {exc.strerror or exc}") from None
    with f:
        for number, line in _numbered_lines(f, path):
            if line.strip():
                yield number, _json_object(line, path, number)


def _numbered_lines(f, path: PathLike) -> Iterator[tuple[int, bytes]]:
    """The file's lines numbered from 1, each at most MAX_LINE_BYTES long: a longer one, or a file that
    cannot be read (a device, /proc/self/mem), is a UserError rather than a hang or a traceback."""
    number = 0
    while True:
        number += 1
        try:
            line = f.readline(MAX_LINE_BYTES + 2)
        except OSError as exc:
            raise UserError(f"{where(path, number)}: cannot read the file ({exc.strerror or exc}); give --data a "
                            "JSONL or Parquet file, or a folder written by `save_to_disk`") from None
        if not line:
            return
        if len(line.rstrip(b"\r\n")) > MAX_LINE_BYTES:
            raise UserError(f"{where(path, number)}: line longer than {_size(MAX_LINE_BYTES)}: not a JSONL "
                            "record (one JSON object per line); shorten the record, or raise "
                            "posttrain.records.MAX_LINE_BYTES if one is really this long")
        yield number, line


def _json_object(line: bytes, path: PathLike, number: int) -> dict[str, Any]:
    """One JSONL line as a dict, every way it can fail named in one line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where(path, number)}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{where(path, number)}: not valid UTF-8 text") from None
    except RecursionError:
        raise UserError(f"{where(path, number)}: JSON nested too deeply to read (expected a flat record "
                        "object)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{where(path, number)}: invalid JSON ({_one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where(path, number)}: expected a JSON object, got {_type(obj)}")
    return obj


def read_sft(path: PathLike) -> list[SFTRecord]:
    """Read SFT examples in prompt/completion or chat-messages format (formats may be mixed)."""
    return _read_all(path, _parse_sft, _SFT_EXPECTED)


def read_preferences(path: PathLike) -> list[PreferenceRecord]:
    """Read preference pairs: `{"prompt", "chosen", "rejected"}` strings, or TRL's conversational records
    (message lists, with the prompt explicit or implicit: see `_parse_conversational_preference`)."""
    return _read_all(path, _parse_preference, _PREFERENCE_EXPECTED)


def read_unpaired(path: PathLike) -> list[UnpairedRecord]:
    """Read labelled completions: `{"prompt", "completion", "label": true | false}`."""
    return _read_all(path, _parse_unpaired, _UNPAIRED_EXPECTED)


def read_prompts(path: PathLike, prompt_field: str = "prompt", answer_field: str = "answer") -> list[PromptRecord]:
    """Read prompts with reference answers: `{"prompt", "answer"}`, or the fields named `prompt_field` and
    `answer_field` (GSM8K's `question`); a number as answer is turned into its text. The other fields are
    kept as the record's `columns`."""
    parse = functools.partial(_parse_prompt, fields=(prompt_field, answer_field))
    return _read_all(path, parse, _PROMPT_EXPECTED.format(prompt=prompt_field, answer=answer_field))


def split_records(records: list, seed: int, limit: int | None = None) -> tuple[list, list]:
    """(train, held_out) records: a seeded 10% held out, at least one record (reused for training if alone).

    With `limit` (a run's eval_problems), held_out is the first `limit` of that tenth, in the seeded order:
    the tenth itself stays out of training, so the training records do not depend on the evaluation's size."""
    records = records[:]
    random.Random(seed).shuffle(records)
    n_held = max(1, len(records) // 10)
    return records[n_held:] or records, records[:n_held][:limit]


def _read_all(path: PathLike, parse: Callable[[dict[str, Any], At], R], expected: str) -> list[R]:
    records = [parse(obj, functools.partial(where, path, number)) for number, obj in read_rows(path)]
    if not records:
        raise UserError(f"{os.fspath(path)}: no records (expected lines or rows with {expected})")
    return records


def _parse_sft(obj: dict[str, Any], at: At) -> SFTRecord:
    if "messages" not in obj:
        return SFTRecord(_string(obj, "prompt", at, _SFT_EXPECTED), _string(obj, "completion", at, _SFT_EXPECTED))
    pairs = _messages(obj, "messages", at)
    if not pairs or pairs[-1][0] != "assistant":
        raise UserError(f"{at('messages')} must end with an 'assistant' message (it is the completion)")
    if len(pairs) < 2:
        raise UserError(f"{at('messages')} needs at least one message before the final assistant message")
    return SFTRecord(prompt=None, completion=pairs[-1][1], messages=tuple(pairs[:-1]))


def _messages(obj: dict[str, Any], key: str, at: At) -> list[tuple[str, str]]:
    """`obj[key]`, a list of {'role', 'content'} objects, as (role, content) pairs."""
    messages = obj[key]
    if not isinstance(messages, list):
        raise UserError(f"{at(key)} must be a list of {{'role', 'content'}} objects, got {_type(messages)}")
    pairs = []
    for i, message in enumerate(messages):
        name = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise UserError(f"{at(name)} must be an object with 'role' and 'content', got {_type(message)}")
        role = _string(message, "role", at, _MESSAGE_EXPECTED, f"{name}.role")
        if role not in ROLES:
            raise UserError(f"{at(name + '.role')} must be one of {', '.join(ROLES)}, got {role!r}")
        pairs.append((role, _string(message, "content", at, _MESSAGE_EXPECTED, f"{name}.content")))
    return pairs


def _parse_preference(obj: dict[str, Any], at: At) -> PreferenceRecord:
    if any(isinstance(obj.get(key), list) for key in ("prompt", "chosen", "rejected")):
        return _parse_conversational_preference(obj, at)
    prompt, chosen, rejected = (_string(obj, key, at, _PREFERENCE_EXPECTED) for key in ("prompt", "chosen", "rejected"))
    if chosen == rejected:
        raise UserError(f"{at('rejected')} is identical to 'chosen', so there is no preference to learn")
    return PreferenceRecord(prompt, chosen, rejected)


def _parse_unpaired(obj: dict[str, Any], at: At) -> UnpairedRecord:
    prompt, completion = (_string(obj, key, at, _UNPAIRED_EXPECTED) for key in ("prompt", "completion"))
    if "label" not in obj:
        raise UserError(f"{at()}: missing field 'label' (expected {_UNPAIRED_EXPECTED})")
    if not isinstance(obj["label"], bool):
        raise UserError(f"{at('label')} must be true (desirable) or false (undesirable), got {_type(obj['label'])}")
    return UnpairedRecord(prompt, completion, obj["label"])


def _parse_conversational_preference(obj: dict[str, Any], at: At) -> PreferenceRecord:
    """TRL's conversational preference record, in either of its forms (trl.data_utils.maybe_extract_prompt):

        explicit prompt  {"prompt": [messages], "chosen": [assistant reply], "rejected": [assistant reply]}
        implicit prompt  {"chosen": [conversation], "rejected": [conversation]}: the messages both begin
                         with are the prompt (a string `prompt` beside them is ignored, as TRL ignores it)

    Both read as two conversations, prompt + chosen and prompt + rejected, that must share every message
    but the last, an assistant reply each. Departs from TRL in refusing replies of several messages: a
    completion here is one reply's text."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise UserError(f"{at()}: missing field {key!r} (expected {_CONVERSATION_EXPECTED})")
    prompt = _messages(obj, "prompt", at) if isinstance(obj.get("prompt"), list) else []
    if isinstance(obj.get("prompt"), list) and not prompt:
        raise UserError(f"{at('prompt')} is an empty list (expected the messages before the reply)")
    chosen, rejected = (prompt + _assistant_ended(obj, key, at) for key in ("chosen", "rejected"))
    if chosen == rejected:
        raise UserError(f"{at('rejected')} is identical to 'chosen', so there is no preference to learn")
    shared = _shared_prefix(chosen, rejected)
    if shared == 0:
        raise UserError(f"{at('rejected')}: chosen and rejected share no prompt (their first messages differ; "
                        "give 'prompt' as a message list, or begin both with the same messages)")
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise UserError(f"{at('rejected')}: chosen and rejected differ from chosen[{shared - len(prompt)}] on; "
                        "they must share every message but the last (the assistant's reply)")
    return PreferenceRecord(tuple(chosen[:shared]), chosen[-1][1], rejected[-1][1])


def _assistant_ended(obj: dict[str, Any], key: str, at: At) -> list[tuple[str, str]]:
    """`obj[key]`'s messages, which must end with the assistant's reply."""
    messages = _messages(obj, key, at)
    if not messages:
        raise UserError(f"{at(key)} is an empty list (expected messages ending with the assistant's reply)")
    if messages[-1][0] != "assistant":
        raise UserError(f"{at(f'{key}[{len(messages) - 1}].role')}: last message must be from the assistant "
                        f"(it is the reply), got {messages[-1][0]!r}")
    return messages


def _shared_prefix(a: list, b: list) -> int:
    """How many leading items `a` and `b` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _parse_prompt(obj: dict[str, Any], at: At, fields: tuple[str, str]) -> PromptRecord:
    prompt_field, answer_field = fields
    expected = _PROMPT_EXPECTED.format(prompt=prompt_field, answer=answer_field)
    for key, aliases, option in ((prompt_field, PROMPT_ALIASES, "prompt_field"),
                                 (answer_field, ANSWER_ALIASES, "answer_field")):
        _require(obj, key, at, expected, aliases, option)
    answer = obj[answer_field]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):  # JSON numbers like 42 or 3.5
        obj = {**obj, answer_field: _number_text(answer, at(answer_field))}
    columns = {key: value for key, value in obj.items() if key not in fields}
    return PromptRecord(_string(obj, prompt_field, at, expected), _string(obj, answer_field, at, expected), columns)


def _require(obj: dict[str, Any], key: str, at: At, expected: str, aliases: tuple[str, ...], option: str) -> None:
    """A missing field's error, hinting at the config key that names the field this record does have."""
    if key in obj:
        return
    present = [alias for alias in aliases if isinstance(obj.get(alias), str)]
    hint = f"; this record has {present[0]!r}: give {option}={present[0]}" if present else ""
    raise UserError(f"{at()}: missing field {key!r} (expected {expected}{hint})")


def _number_text(value: float, name: str) -> str:
    """A JSON number as answer text, without exponent (1e+20 -> 100000000000000000000)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number or a string, got {value}")
    return str(value) if isinstance(value, int) else format(Decimal(repr(value)), "f")


def _string(obj: dict[str, Any], key: str, at: At, expected: str, name: str | None = None) -> str:
    """Return `obj[key]` if it is a non-blank string of valid Unicode; `name` is how the field is called in
    messages. (JSON may escape a lone surrogate, "\\ud800", which no tokenizer can encode.)"""
    name = name or key
    if key not in obj:
        raise UserError(f"{at()}: missing field {name!r} (expected {expected})")
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f"{at(name)} must be a string, got {_type(value)}")
    if not value.strip():
        raise UserError(f"{at(name)} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{at(name)} holds an unpaired surrogate ({value[exc.start]!r} at character {exc.start}), "
                        "which is not text; fix the \\u escape in the file") from None
    return value


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n:,} bytes"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _type(value: Any) -> str:
    """Name a JSON value's type the way a user reads it (`null`, not NoneType)."""
    return "null" if value is None else type(value).__name__
