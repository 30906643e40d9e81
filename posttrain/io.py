"""Atomic file output, so an interrupted run never leaves a half-written file behind.

Everything is first written to a temporary sibling and then renamed over the
target: a rename within one directory is atomic, so readers see either the
old file or the complete new one. Parent directories are created as needed.

A full disk is the user's to fix, not a crash: a write that runs out of space (`ENOSPC`, or a library's
own error while the disk is full) removes its temporary and raises a one-line `UserError`, and a folder
whose size is known beforehand (a model, a checkpoint) is refused before anything is written when the
disk lacks room for it.
"""

from __future__ import annotations

import contextlib
import errno
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

SPACE_MARGIN = 1.1  # a folder of n bytes of tensors is written only with n * margin + slack bytes free:
SPACE_SLACK = 16 * 2**20  # room for its small files (tokenizer, config, JSON) and the filesystem's own blocks


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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if _out_of_space(exc):
            raise UserError(f"no space left on the disk to write {path}; free some space and run again") from None
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
def atomic_dir(final_path: PathLike, needed_bytes: int = 0, what: str = "") -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `final_path` only if the block succeeds.

    Used for saving model folders: a crash mid-save leaves any previous
    `final_path` untouched and removes the partial one. An existing directory
    is replaced by moving it aside, moving the new one in, then deleting the old.
    With `needed_bytes` (the tensors it will hold), a disk without room for them is refused first
    (`check_free_space`); a disk that fills up during the block is the same one-line `UserError`.
    `what` names the folder in those messages ("the model", "a checkpoint").
    """
    final = os.fspath(final_path).rstrip(os.sep)
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    what = what or final
    if needed_bytes:
        check_free_space(final, needed_bytes, what)
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
    except BaseException as exc:
        full = _out_of_space(exc, tmp)  # asked before the partial folder is removed and frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise UserError(f"the disk filled up while writing {what} to {final}; {_FREE_SPACE_HINT}; "
                            f"{_previous(final)}") from None
        raise


_FREE_SPACE_HINT = "free some space (`posttrain cache --prune` removes stale cached models) and run again"


def check_free_space(path: PathLike, needed_bytes: int, what: str) -> None:
    """A one-line `UserError` when the disk that will hold `path` has fewer than
    needed_bytes * SPACE_MARGIN + SPACE_SLACK bytes free; nothing is written either way."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    wanted, free = int(needed_bytes * SPACE_MARGIN) + SPACE_SLACK, shutil.disk_usage(existing).free
    if free < wanted:
        raise UserError(f"not enough disk space for {what} in {existing}: about {_megabytes(wanted)} needed, "
                        f"{_megabytes(free)} free; {_FREE_SPACE_HINT}; {_previous(os.fspath(path))}")


def _previous(final: str) -> str:
    return f"{final} was left as it was" if os.path.exists(final) else "nothing was written"


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _out_of_space(exc: BaseException, folder: PathLike | None = None) -> bool:
    """Whether `exc` (or an exception it chains) is a full disk: `ENOSPC`/`EDQUOT`, a library's message
    saying so (safetensors' "StorageFull"), or, for the errors libraries raise in their own words (torch.save's
    "unexpected pos"), any exception while `folder`'s disk has less than SPACE_SLACK bytes free."""
    if not isinstance(exc, Exception):
        return False  # Ctrl-C, SIGTERM: never a full disk
    chain, each = [], exc
    while each is not None and len(chain) < 8:  # the exception and what it was raised from
        chain.append(each)
        each = each.__cause__ or each.__context__
    for each in chain:
        if isinstance(each, OSError) and each.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(each) for words in ("No space left", "StorageFull", "Disk quota exceeded")):
            return True
    if folder is None:
        return False
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < SPACE_SLACK
    return False


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
