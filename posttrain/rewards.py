"""Reward functions a user brings to GRPO and PPO: `reward=path/to/file.py:function` or
`reward=package.module:function`, several comma-separated and summed with `reward_weights`.

Each has TRL's signature for reward functions, with the reference answers named:

    def reward(prompts: list[str], completions: list[str], answers: list[str], **columns) -> list[float]

one finite float per completion; `columns` holds the records' other fields as keyword lists, one value
per completion (None where a record lacks the field). Everything that can be checked without a model is
checked when the run starts, before any model loads: the file or module, the function, and one call on
the first records with their reference answers as the completions (the right number of finite floats).
Each of those failures is one UserError line naming the `reward` entry. During training every call is
checked the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import UserError
from posttrain.records import split_records

SIGNATURE = "(prompts, completions, answers, **columns) -> list[float]"
POSITIONAL = ("prompts", "completions", "answers")  # never passed as columns: they would clash
PROBE_RECORDS = 2  # records of the first call, made before any model loads
WORLD_PROBE = (["What is 2 plus 3?"], ["5"])  # the first call's (prompt, answer) without records


def is_user_reward(spec: str) -> bool:
    """True for `file.py:function` / `module:function` entries, False for the built-in names (verifier, orm, prm)."""
    return ":" in spec


def reward_entries(spec: str, weights: Sequence[float] = ()) -> list[tuple[str, float]]:
    """(entry, weight) pairs of a `reward=a.py:f,b.py:g` value and its `reward_weights` (default 1 each)."""
    entries = [entry.strip() for entry in spec.split(",")]
    for entry in entries:
        target, _, name = entry.rpartition(":")
        if not target or not name.isidentifier():
            raise UserError(f"reward: {entry!r} is not FILE.py:FUNCTION or package.module:FUNCTION")
    if weights and len(weights) != len(entries):
        raise UserError(f"reward_weights has {len(weights)} values for {len(entries)} reward functions; give one "
                        "weight per function, in order, or none (1 each)")
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"reward_weights must be finite numbers, got {list(weights)}")
    return list(zip(entries, weights or [1.0] * len(entries)))


def check_reward_choice(reward: str, weights: Sequence[float], builtin: tuple[str, ...]) -> None:
    """A method config's `reward` and `reward_weights` checked by their syntax alone (nothing is loaded)."""
    if is_user_reward(reward):
        reward_entries(reward, weights)
        return
    if reward not in builtin:
        raise UserError(f"reward must be {' or '.join(builtin)}, or your own function(s) as FILE.py:FUNCTION or "
                        f"package.module:FUNCTION, got '{reward}'")
    if weights:
        raise UserError("reward_weights weigh your own reward functions (reward=a.py:f,b.py:g); "
                        f"reward={reward} takes none")


def user_reward_answers(cfg, records: list | None) -> list[str] | None:
    """The references of a PPO/GRPO run's held-out user records (the split of heldout.run_prompts), whose
    mean reward (the run's own reward function) over the greedy completions is reported beside accuracy;
    None for world problems."""
    if records is None:
        return None
    return [r.answer for r in split_records(records, cfg.seed)[1][: cfg.eval_problems]]


def held_out_reward(reward: Callable, result: dict, answers: list[str] | None) -> dict:
    """{"reward": the mean reward of a held-out evaluation's greedy completions} (its `prompts` and
    `completions`, `answers` their references), or {} without answers."""
    if answers is None:
        return {}
    values = reward(result["prompts"], result["completions"], answers)
    return {"reward": sum(values) / len(values)}


def load_function(entry: str) -> Callable:
    """The function an entry names, its file executed or its module imported."""
    target, _, name = entry.rpartition(":")
    module = _module_of_file(entry, Path(target)) if target.endswith(".py") else _imported(entry, target)
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise UserError(f"reward={entry}: {target} has no function {name!r} (it defines: "
                        f"{', '.join(defined) or 'no functions'})")
    return function


def _module_of_file(entry: str, path: Path):
    if not path.is_file():
        raise UserError(f"reward={entry}: file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"posttrain_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: its own bug, reported as where it is
        raise UserError(f"reward={entry}: loading {_raised_where(exc, path)} failed: {_one_line(exc)}") from None
    return module


def _imported(entry: str, name: str):
    with _cwd_importable():
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                raise UserError(f"reward={entry}: no module {exc.name!r} (install it, or give a file as "
                                "path/to/file.py:FUNCTION)") from None
            raise UserError(f"reward={entry}: importing {name} failed: {_one_line(exc)}") from None
        except Exception as exc:
            raise UserError(f"reward={entry}: importing {name} failed: {_one_line(exc)}") from None


@contextlib.contextmanager
def _cwd_importable():
    """Modules of the working directory importable, as `python -m` makes them, for the import only."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        yield
    finally:
        if added:
            sys.path.remove(os.getcwd())


@dataclasses.dataclass
class UserReward:
    """A RewardFn (rollouts.py): the weighted sum of the user's functions, each given the columns of the
    records its (prompt, answer) rows came from."""

    functions: list[tuple[str, Callable, float]]  # (entry, function, weight)
    columns_of: dict[tuple[str, str], dict[str, Any]]  # (prompt, answer) -> the record's other fields
    column_names: list[str]

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
        rows = [self.columns_of.get((p, a), {}) for p, a in zip(prompts, answers)]
        columns = {name: [row.get(name) for row in rows] for name in self.column_names}
        total = [0.0] * len(completions)
        for entry, function, weight in self.functions:
            values = checked(entry, function(list(prompts), list(completions), list(answers), **columns),
                             len(completions))
            total = [t + weight * v for t, v in zip(total, values)]
        return total


def checked(entry: str, values: Any, n: int) -> list[float]:
    """`values` as n finite floats, or a UserError saying what the function returned instead."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"reward={entry} must return a list of {n} floats {SIGNATURE}; got "
                        f"{_short(values)}") from None
    if len(values) != n:
        raise UserError(f"reward={entry} returned {len(values)} values for {n} completions; return one float "
                        "per completion")
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(f"reward={entry} returned {values[bad]} for completion {bad}; rewards must be finite "
                        "numbers")
    return values


def load_user_reward(spec: str, weights: Sequence[float] = (), records: list | None = None) -> UserReward:
    """The reward of a `reward=` value, loaded and called once on the first records (their answers as the
    completions), so that every mistake shows before any model loads."""
    functions = [(entry, load_function(entry), weight) for entry, weight in reward_entries(spec, weights)]
    records = records or []
    columns_of = {}
    for r in records:
        columns_of.setdefault((r.prompt, r.answer), r.columns)
    names = sorted({name for r in records for name in r.columns if name not in POSITIONAL})
    for function in functions:
        _try_once(UserReward([function], columns_of, names), records)
    return UserReward(functions, columns_of, names)


def _try_once(reward: UserReward, records: list) -> None:
    """Call a one-function reward on the first records, their answers as the completions (a world question
    without records). Its own exceptions keep their traceback, with a note saying which call it was."""
    first = records[:PROBE_RECORDS]
    prompts, answers = ([r.prompt for r in first], [r.answer for r in first]) if first else WORLD_PROBE
    entry = reward.functions[0][0]
    try:
        reward(prompts, answers, answers)
    except UserError:
        raise
    except Exception as exc:
        exc.add_note(f"raised by reward={entry} on a first call {SIGNATURE}, with {len(prompts)} records' "
                     "answers as the completions")
        raise


def warn_if_all_zero(scores: Sequence[float], what: str) -> bool:
    """Say on stderr, in one line, when every score of `what` is 0: a run that would learn or show nothing,
    most often because the answers are not read as the data writes them. Returns whether it warned."""
    if any(float(s) != 0 for s in scores):
        return False
    print(f"warning: every reward of {what} is 0 ({len(scores)} scored): check how answers are read "
          "(\\boxed{}, ####, A:, 'the answer is', else the last number), max_new_tokens, prompt_field/answer_field, "
          "or the reward function; summary.json says metrics.all_rewards_zero", file=sys.stderr)
    return True


def _raised_where(exc: BaseException, path: Path) -> str:
    """`file:line` of the error inside the user's file (a SyntaxError's own line), else the file."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{path}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path.resolve()
              or Path(f.filename) == path]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


def _one_line(exc: BaseException) -> str:
    message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    return f"{type(exc).__name__}: {' '.join(str(message).split())}".rstrip(": ")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
