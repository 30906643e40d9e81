"""Errors caused by the user's input, and how their messages name the culprit.

The CLI catches `UserError`, prints `error: <message>` on one line and exits
with code 2, so a bad file or config never shows a Python traceback, and
`TrainingInterrupted` (Ctrl-C or SIGTERM, checkpoint saved), exiting with 130 or 143. Every
other exception is a bug in posttrain and is allowed to crash loudly. (This
module imports nothing heavy: the CLI's `--help` does not wait for torch.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class UserError(Exception):
    """A problem the user can fix: a bad file, a bad config value, a missing path."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (what `kill` and job schedulers send) as an exception, caught like Ctrl-C."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during training; a checkpoint was saved and `--resume` continues from it."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


def exit_status(exc: BaseException) -> int:
    """The shell's status for a process ended by the signal behind `exc`: 128 + its number (130 for Ctrl-C)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises `Interrupted(SIGTERM)` as Ctrl-C raises KeyboardInterrupt, so both save
    what a Ctrl-C saves. Outside the main thread, where signals cannot be caught, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = raise_on_sigterm()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_on_sigterm():
    """From now on SIGTERM raises `Interrupted(SIGTERM)` in the main thread; returns the handler it replaces.
    What a worker process (the demonstration's stages) calls, so a SIGTERM saves its checkpoint."""
    return signal.signal(signal.SIGTERM, _raise_interrupted)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def where(path: str | os.PathLike[str], line: int | None = None, field: str | None = None) -> str:
    """Return a location like `data.jsonl:3: field 'prompt'` for the start of a message.

    Shared so that every message names file, line and field the same way;
    callers append `: what went wrong` or ` is empty` etc.
    """
    text = os.fspath(path) if line is None else f"{os.fspath(path)}:{line}"
    return text if field is None else f"{text}: field {field!r}"
