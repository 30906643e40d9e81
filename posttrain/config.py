"""Load a method's config dataclass from defaults, a YAML file and `key=value` overrides.

Each method defines a flat dataclass with one defaulted field per setting.
Precedence is defaults < the model's defaults (a user's model: methods/__init__.py)
< YAML file < command-line overrides, so a run can be tweaked without editing its
file. Values are converted to each field's annotated type here, so methods only
ever see correctly typed configs, and every mistake becomes a `UserError` naming
the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from posttrain.errors import UserError, where

T = TypeVar("T")

# Scalar types a field (or a list element) may have: (singular, plural) descriptions.
_SCALARS: dict[type, tuple[str, str]] = {
    int: ("an int", "ints"),
    float: ("a float", "floats"),
    bool: ("a bool (true/false/yes/no/1/0)", "bools"),
    str: ("a string", "strings"),
}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_NONE_WORDS = ("none", "null")


# TRL's (and transformers' TrainingArguments') names for settings posttrain names otherwise, accepted as they are:
# a config written for TRL carries over. Keys with the same name in both (seed, beta, temperature,
# num_generations, max_grad_norm, warmup_steps, weight_decay, ...) need no entry. Where posttrain's meaning is
# wider, the docstring of the key says so: batch_size is the global batch (one process: TRL's per-device one),
# and an RL method's steps are rollout batches.
TRL_NAMES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_completion_length": "max_new_tokens",
    "num_iterations": "epochs",
    "epsilon": "clip_eps",
    "logging_steps": "log_every",
    "save_steps": "checkpoint_every",
}


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = (),
                defaults: Mapping[str, Any] | None = None) -> T:
    """Build `cls` from its defaults, then `defaults` (the model's, e.g. the larger learning rates of a
    100M-parameter model: they replace the class's defaults, never a value the file or the command line
    sets), then the YAML file at `path`, then `key=value` overrides.

    Calls `validate()` on the result when the class defines it, so methods can
    reject out-of-range values with a `UserError`.
    """
    hints = typing.get_type_hints(cls)  # resolves string annotations
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    sources: list[tuple[str, Mapping[Any, Any]]] = [("defaults for the model", defaults or {})]
    if path is not None:
        sources.append((path, _read_yaml(path)))
    sources.append(("command line", _parse_overrides(overrides)))
    for source, mapping in sources:
        for key, value in mapping.items():
            key = _field_name(str(key), valid)
            if key not in valid:
                raise UserError(_unknown_key(key, source, valid))
            values[key] = _convert_field(value, hints[key], f"config key {key!r} ({source})")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def given_keys(cls: type, path: str | None = None, overrides: Sequence[str] = ()) -> set[str]:
    """The fields of `cls` that the YAML file at `path` or the `key=value` overrides set (TRL's names
    read as posttrain's): the keys a model's defaults must leave alone."""
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    keys = [*(_read_yaml(path) if path is not None else {}), *_parse_overrides(overrides)]
    return {_field_name(str(key), valid) for key in keys}


def _field_name(key: str, valid: Sequence[str]) -> str:
    """`key` as the config's field name: TRL's name of a setting (`learning_rate`) becomes posttrain's (`lr`)."""
    return TRL_NAMES[key] if key not in valid and TRL_NAMES.get(key) in valid else key


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config as a JSON-friendly dict (tuples become lists), e.g. for saving with a run."""
    return _lists(dataclasses.asdict(cfg))


def describe_config(cls: type) -> str:
    """Return one line per field, `name: type = default  # help`, for `--help`-style listings.

    The help is the field's `dataclasses.field(metadata={"help": ...})`, else the comment that ends
    the field's line in the class's source (`steps: int = 200  # optimizer steps`) or stands on the
    lines just above it.
    """
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        line = f"{f.name}: {_type_name(hints[f.name])} = {default}"
        help_text = f.metadata.get("help") or comments.get(f.name)
        if help_text:
            line += f"  # {help_text}"
        lines.append(line)
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    """{field: the comment ending its line, else the comment lines just above it} over the dataclass
    and its dataclass bases (a subclass's line wins); none where the source cannot be read."""
    fields = {f.name for f in dataclasses.fields(cls)}
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above = []  # the comment lines just above the current line
        for line in source.splitlines():
            if re.match(r"\s+#", line):
                above.append(line.strip().lstrip("#").strip())
                continue
            match = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s*(.+))?$", line)
            if match and match.group(1) in fields and (match.group(2) or above):
                comments[match.group(1)] = (match.group(2) or " ".join(above)).strip()
            above = []
    return comments


def _read_yaml(path: str) -> dict[Any, Any]:
    """Read a YAML mapping; an empty (or comments-only) file means "no changes"."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where(path, mark.line + 1 if mark else None)}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys to values, got {type(data).__name__}")
    return data


def _parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """Split command-line `key=value` strings; later ones win, like in the YAML file."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"config override {item!r} (command line): expected the form key=value, e.g. lr=1e-5")
        parsed[key.strip()] = value
    return parsed


def _unknown_key(key: str, source: str, valid: list[str]) -> str:
    message = f"unknown config key {key!r} ({source})"
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return f"{message}; valid keys: {', '.join(valid)}"


def _convert_field(value: Any, tp: Any, what: str) -> Any:
    """Convert a YAML value or override string to `tp`, or raise a `UserError` saying what was expected."""
    try:
        converted = _convert(value, tp)
    except ValueError:
        raise UserError(f"{what}: expected {_describe(tp)}, got {value!r}") from None
    if not _all_finite(converted):
        raise UserError(f"{what}: expected a finite number, got {value!r}")
    return converted


def _all_finite(value: Any) -> bool:
    """False when `value` is, or a list of it holds, a NaN or infinite float: no setting means those."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_all_finite(item) for item in value)
    return True


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config key allows: `low` and `high` bounds (None: unbounded), each closed
    unless marked open. `str()` writes it for messages: `>= 1`, `> 0`, `in [0, 1]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low, high = (bound if not isinstance(bound, float) else f"{bound:g}" for bound in (self.low, self.high))
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def check_ranges(cfg: Any, ranges: dict[str, Range]) -> None:
    """Raise a `UserError` naming the first key of `ranges` whose value in `cfg` lies outside its range."""
    for key, allowed in ranges.items():
        value = getattr(cfg, key)
        if value is not None and value not in allowed:
            raise UserError(f"config key {key!r} must be {allowed}, got {value!r}")


def check_choice(key: str, value: Any, choices: Sequence[Any], optional: bool = False) -> None:
    """Raise a `UserError` naming `key` unless `value` is one of `choices` (or None, when `optional`)."""
    if value not in choices and not (optional and value is None):
        raise UserError(f"{key} must be one of {', '.join(map(str, choices))}, got '{value}'")


def check_choices(key: str, values: Sequence[Any], choices: Sequence[Any]) -> None:
    """Raise a `UserError` naming `key` unless `values` is a non-empty list of `choices`."""
    if not values or any(v not in choices for v in values):
        raise UserError(f"{key} must be a non-empty list among {', '.join(map(str, choices))}, got {list(values)}")


def _list_items(text: str) -> list[str]:
    """The items of a list written on the command line: `1,2,4`, or as --help shows it, `[1, 2, 4]` or
    `['q_proj', 'v_proj']`; `[]` and the empty string are the empty list."""
    text = text.strip()
    if text[:1] + text[-1:] in ("[]", "()"):
        text = text[1:-1].strip()
    items = [part.strip() for part in text.split(",")] if text else []
    return [item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item for item in items]


def _convert(value: Any, tp: Any) -> Any:
    """Convert `value` to `tp`, raising ValueError when it does not fit.

    Strings are parsed (they come from the command line, or from YAML for
    spellings like `1e-5` that YAML leaves as strings); other values must
    already have the right type. Unsupported annotations raise TypeError:
    that is a bug in the method's config class, not the user's fault.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _optional_inner(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return _convert(value, inner)
    if origin in (list, tuple):
        if isinstance(value, str):
            items = _list_items(value)
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # a lone YAML scalar is a one-element list, as `ranks=4` is
        if origin is list or args[-1] is Ellipsis:
            return origin(_convert(item, args[0]) for item in items)
        if len(items) != len(args):
            raise ValueError
        return tuple(_convert(item, t) for item, t in zip(items, args))
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config field type: {tp!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise ValueError
    if isinstance(value, bool):
        raise ValueError  # True is an int in Python; never let it pass as 1
    if isinstance(value, str):
        return value if tp is str else tp(value.strip())
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, tp):
        return value
    raise ValueError


def _optional_inner(tp: Any) -> Any:
    """Return X for `X | None`; other unions are not supported in configs."""
    args = typing.get_args(tp)
    inner = [a for a in args if a is not type(None)]
    if len(inner) != 1 or len(args) != 2:
        raise TypeError(f"unsupported config field type: {tp!r} (only `X | None` unions are supported)")
    return inner[0]


def _describe(tp: Any) -> str:
    """Describe what a field accepts, for error messages: 'a float', 'a list of ints', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return f"{_describe(_optional_inner(tp))} or none"
    if origin is list or (origin is tuple and args[-1] is Ellipsis):
        return f"a comma-separated list of {_SCALARS[args[0]][1]}"
    if origin is tuple:
        return f"a comma-separated list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return _SCALARS[tp][0]


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj
