"""Locks on cache entries: one process builds an entry, and the processes using it keep it from being deleted.

Each entry `<path>` (a base model's or a stage's folder) has a lock file `<path>.lock`, locked two ways:

- building holds it exclusively (filelock's `FileLock`, on Unix an `flock(LOCK_EX)` of that file) and
  writes who holds it into `<path>.lock.holder` ("pid N since T"); a process that has to wait prints that
  line once rather than waiting in silence;
- using a built entry holds it shared (`fcntl.flock(LOCK_SH)`) for the rest of the process, and notes the
  process's pid in a file `.<name>.reader-<pid>` beside it; `posttrain cache --clear/--prune` tries the
  exclusive lock without waiting, so it skips an entry any process is building or using.

Why `flock` shared locks rather than reader files alone: the kernel drops a process's lock however the
process ends (`kill -9` included), so a dead reader never pins an entry, and a pid reused by another
program never counts as one; and filelock's exclusive lock is a lock of the same kind on the same file, so
builders, readers and `cache` exclude each other with no second mechanism (filelock has no shared mode).
The pid files only name the readers in `cache`'s messages. Where `fcntl` is missing (Windows) readers
take no lock.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from posttrain.io import write_text

try:
    import fcntl
except ImportError:  # Windows: no shared locks
    fcntl = None

_held: dict[Path, int] = {}  # entry -> the open lock file whose shared lock this process holds


def lock_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


def holder_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock.holder")


def reader_path(entry: Path, pid: int) -> Path:
    return entry.with_name(f".{entry.name}.reader-{pid}")


def reader_paths(entry: Path) -> list[Path]:
    """The pid files of `entry`'s readers, live or not."""
    return sorted(entry.parent.glob(f".{entry.name}.reader-*"))


def holder(entry: Path) -> str:
    """Who builds `entry` ("pid N since T"), as its builder wrote it; "another process" if unknown."""
    try:
        return holder_path(entry).read_text().strip() or "another process"
    except OSError:
        return "another process"


def readers(entry: Path) -> list[int]:
    """The pids of the live processes that noted they use `entry`."""
    suffixes = (p.name.rpartition("-")[2] for p in reader_paths(entry))
    pids = [int(s) for s in suffixes if s.isdigit()]
    return sorted(pid for pid in pids if _alive(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _announce_wait(entry: Path) -> None:
    print(f"posttrain: waiting for {entry.name}: {holder(entry)} holds {lock_path(entry).name}", flush=True)


@contextlib.contextmanager
def building(entry: Path) -> Iterator[None]:
    """Hold `entry`'s exclusive lock for the block, noting this process as its holder; if another process
    holds it, say who (one line) and wait."""
    lock = FileLock(str(lock_path(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _announce_wait(entry)
        lock.acquire()
    try:
        write_text(holder_path(entry), f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        yield
    finally:
        holder_path(entry).unlink(missing_ok=True)
        lock.release()


def use(entry: Path, built: Callable[[], bool]) -> bool:
    """Hold `entry`'s shared lock for the rest of the process if `built()`, and return True; False, holding
    nothing, if it is not built (the caller builds it under `building` and asks again)."""
    if entry in _held:
        return True
    if fcntl is None:
        return built()
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(entry), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        _announce_wait(entry)
        fcntl.flock(fd, fcntl.LOCK_SH)
    if not (_same_file(fd, lock_path(entry)) and built()):  # not built, or removed while we waited
        os.close(fd)
        return False
    _held[entry] = fd
    reader_path(entry, os.getpid()).touch()
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open `fd` is still the file at `path` (`cache` deletes the lock file with its entry)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def release(entry: Path) -> None:
    """Stop using `entry`: drop this process's shared lock and its note among the readers."""
    fd = _held.pop(entry, None)
    if fd is not None:
        reader_path(entry, os.getpid()).unlink(missing_ok=True)
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for entry in list(_held):
        release(entry)
