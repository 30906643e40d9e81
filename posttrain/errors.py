"""Errors caused by the user's input, and how their messages name the culprit.

The CLI catches `UserError`, prints `error: <message>` on one line and exits
with code 2, so a bad file or config never shows a Python traceback, and
`TrainingInterrupted` (Ctrl-C, checkpoint saved), exiting with 130. Every
other exception is a bug in posttrain and is allowed to crash loudly. (This
module imports nothing heavy: the CLI's `--help` does not wait for torch.)
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem the user can fix: a bad file, a bad config value, a missing path."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved and `--resume` continues from it."""


def where(path: str | os.PathLike[str], line: int | None = None, field: str | None = None) -> str:
    """Return a location like `data.jsonl:3: field 'prompt'` for the start of a message.

    Shared so that every message names file, line and field the same way;
    callers append `: what went wrong` or ` is empty` etc.
    """
    text = os.fspath(path) if line is None else f"{os.fspath(path)}:{line}"
    return text if field is None else f"{text}: field {field!r}"
