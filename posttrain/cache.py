"""What posttrain keeps in its cache, and removing what the current code can no longer reuse.

    <cache>/                                   $POSTTRAIN_CACHE, else ~/.cache/posttrain
      base-models/tiny-<fingerprint>/          embedded base models (models.ensure_embedded), converted
                                               packaged ones (models.ensure_packaged), and
      base-models/.tiny-<fingerprint>.work/    their pretraining logs
      stages/sft-<key>/                        shared stages (stages.cached_run); stage.json holds
                                               what the key hashes, the package's source included

Every entry is keyed by what built it, so nothing is ever reused stale, but nothing is removed
either: each edit of the package's source makes the next demonstration build its stages anew in new
folders. An entry is stale when the current code cannot ask for it again: a base model whose
fingerprint is not its name's current one, a stage built by other source code. `posttrain cache`
lists the entries, `--prune` removes the stale ones, `--clear` all of them; an entry a running process
builds or uses (it holds the entry's lock: posttrain/locks.py) is left alone.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from posttrain import locks
from posttrain.models import base_model_fingerprint, cache_dir
from posttrain.stages import RECORD, source_fingerprint

CURRENT = "current"


@dataclasses.dataclass
class Entry:
    kind: str  # "base model" | "stage"
    path: Path
    state: str  # CURRENT, "interrupted" (kept: the next run that needs it completes it), or why it is stale
    size: int  # bytes, its pretraining log included for a base model

    @property
    def stale(self) -> bool:
        return self.state not in (CURRENT, "interrupted")

    @property
    def log(self) -> Path:
        """A base model's pretraining log folder (none beside a stage)."""
        return log_of(self.path)


def log_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.work")


def entries(root: Path | None = None) -> list[Entry]:
    root = root or cache_dir()
    models = root / "base-models"
    built = {p.name for p in _folders(models)}
    logs = {p.name[1:-len(".work")] for p in _folders(models, ".*.work")}  # a log without a model: interrupted
    stages = [_stage(p) for p in _folders(root / "stages")]
    return [_base_model(models / name) for name in sorted(built | logs)] + stages


def _folders(parent: Path, pattern: str = "[!.]*") -> list[Path]:
    return sorted(p for p in parent.glob(pattern) if p.is_dir())


def _base_model(path: Path) -> Entry:
    name, _, fingerprint = path.name.rpartition("-")
    current = base_model_fingerprint(name)
    if current is None:
        state = "stale: no base model of that name"
    elif fingerprint != current:
        state = "stale: built from another base-model config, world or package version"
    else:
        state = CURRENT if (path / "config.json").exists() else "interrupted"
    return Entry("base model", path, state, _size(path) + _size(log_of(path)))


def _stage(path: Path) -> Entry:
    try:
        source = json.loads((path / RECORD).read_text())["source"]
    except (OSError, ValueError, KeyError):
        source = None  # built before stages recorded their inputs, or the record is unreadable
    if source != source_fingerprint():
        state = "stale: built by other source code"
    else:
        state = CURRENT if (path / "summary.json").exists() else "interrupted"
    return Entry("stage", path, state, _size(path))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def remove(entry: Entry) -> bool:
    """Delete an entry, its log, its lock file and its readers' notes; False (nothing deleted) while a process
    builds or uses it (holds its lock, exclusive or shared)."""
    lock = FileLock(str(locks.lock_path(entry.path)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        shutil.rmtree(entry.path, ignore_errors=True)
        shutil.rmtree(entry.log, ignore_errors=True)
        for note in locks.reader_paths(entry.path):
            note.unlink(missing_ok=True)
        locks.holder_path(entry.path).unlink(missing_ok=True)  # left by a builder that was killed
        locks.lock_path(entry.path).unlink(missing_ok=True)
    finally:
        lock.release()
    return True


def in_use_by(entry: Entry) -> str:
    """Who keeps `entry` from being removed: the pids of the processes using it, else its builder."""
    pids = locks.readers(entry.path)
    if pids:
        return "in use by " + ", ".join(f"pid {pid}" for pid in pids)
    return f"being built by {locks.holder(entry.path)}"


def human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


def stale_note(root: Path | None = None) -> str:
    """One line on the stale entries, for the end of a demonstration ("" when there are none)."""
    stale = [e for e in entries(root) if e.stale]
    if not stale:
        return ""
    return (f"the cache holds {len(stale)} entries ({human_size(sum(e.size for e in stale))}) that the current "
            "code cannot reuse; `posttrain cache --prune` removes them")


def run_cache(prune: bool, clear: bool) -> int:
    """`posttrain cache [--prune | --clear]`: list the entries, or remove the stale ones or all."""
    root = cache_dir()
    found = entries(root)
    if not (prune or clear):
        for e in found:
            print(f"{e.kind:10}  {e.path.name:32}  {human_size(e.size):>8}  {e.state}")
        stale = [e for e in found if e.stale]
        hint = " (`posttrain cache --prune` removes them)" if stale else ""
        print(f"{root}: {len(found)} entries, {human_size(sum(e.size for e in found))}; "
              f"{len(stale)} stale, {human_size(sum(e.size for e in stale))}{hint}")
        return 0
    chosen = [e for e in found if clear or e.stale]
    removed = [e for e in chosen if remove(e)]
    for e in chosen:
        if e not in removed:
            print(f"kept {e.path.name}: {in_use_by(e)}")
    print(f"removed {len(removed)} of {len(found)} entries from {root}, {human_size(sum(e.size for e in removed))}")
    return 0
