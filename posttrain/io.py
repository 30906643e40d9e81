"""Atomic file output, so an interrupted run never leaves a half-written file behind.

Everything is first written to a temporary sibling and then renamed over the
target: a rename within one directory is atomic, so readers see either the
old file or the complete new one. Parent directories are created as needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from posttrain.errors import UserError, where

PathLike = str | os.PathLike[str]


def write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Our own temp name rather than tempfile.mkstemp, whose 0600 mode would stick to the final file.
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Atomically replace `path` with UTF-8 `text`."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON; NaN and infinities become null.

    Python's default JSON output writes `NaN`, which is not valid JSON and
    breaks other tools, so non-finite floats (e.g. a diverged loss) are
    stored as null. Serialisation happens before anything touches the disk.
    """
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: PathLike) -> Any:
    """Read a JSON file, turning a missing or unreadable file or invalid JSON into a `UserError`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {os.fspath(path)}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where(path, exc.lineno)}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{os.fspath(path)}: invalid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise UserError(f"{os.fspath(path)}: invalid JSON (nested too deeply to read)") from None
    except OSError as exc:
        raise UserError(f"{os.fspath(path)}: cannot be read ({exc.strerror})") from None


class JsonlWriter:
    """Append one JSON object per line (e.g. `metrics.jsonl`), flushed after every record.

    With `resume_step`, records whose `step` is greater than it are dropped
    first: they came from the part of the interrupted run that is about to be
    redone, and keeping them would duplicate steps. Unparseable lines (a line
    cut short by a crash) are dropped too; records without a `step` are kept.
    The records kept are in `resumed`.
    """

    def __init__(self, path: PathLike, resume_step: int | None = None) -> None:
        self.path = os.fspath(path)
        self.resumed: list[dict[str, Any]] = []
        if resume_step is not None and os.path.exists(self.path):
            self._keep_through(resume_step)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        """Write `record` as one line; non-finite floats become null as in `write_json`."""
        self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _keep_through(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or record.get("step", step) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    self.resumed += [record] if isinstance(record, dict) else []
        write_text(self.path, "".join(kept))


@contextlib.contextmanager
def atomic_dir(final_path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `final_path` only if the block succeeds.

    Used for saving model folders: a crash mid-save leaves any previous
    `final_path` untouched and removes the partial one. An existing directory
    is replaced by moving it aside, moving the new one in, then deleting the old.
    """
    final = os.fspath(final_path).rstrip(os.sep)
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    tmp = _sibling(final, "tmp")
    os.mkdir(tmp)
    try:
        yield Path(tmp)
        if os.path.exists(final):
            old = _sibling(final, "old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(final_path: PathLike) -> None:
    """Finish what a killed `atomic_dir` left next to `final_path`: its partial `.tmp-*` folders are removed, and
    a `.old-*` folder left alone (killed between moving the old folder aside and moving the new one in) becomes
    `final_path` again; one left beside a complete `final_path` is removed. For a folder one process owns (a
    run's checkpoint): another process's write in progress would look the same."""
    final = os.fspath(final_path).rstrip(os.sep)
    for tmp in _siblings(final, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(_siblings(final, "old"), key=os.path.getmtime)
    if olds and not os.path.exists(final):
        os.rename(olds.pop(), final)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _siblings(path: str, kind: str) -> list[str]:
    """The folders `_sibling(path, kind)` may have named."""
    head, tail = os.path.split(path)
    prefix = f".{tail}.{kind}-"
    try:
        names = os.listdir(head or ".")
    except FileNotFoundError:
        return []
    return [os.path.join(head, name) for name in names if name.startswith(prefix)]


def _sibling(path: str, kind: str) -> str:
    """A unique hidden name next to `path`, so a rename to `path` stays on one filesystem."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{kind}-{uuid.uuid4().hex[:8]}")


def _finite(obj: Any) -> Any:
    """Copy `obj` with NaN and infinite floats replaced by None, recursing into dicts and lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
