"""The cache: stages record what their key hashes; `posttrain cache` tells reusable entries from stale ones."""
import dataclasses
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from posttrain import locks, stages
from posttrain.cache import stale_note
from posttrain.cli import main
from posttrain.pretraining import EMBEDDED


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    return tmp_path


@dataclasses.dataclass
class ToyConfig:
    output_dir: str = "runs/toy"
    steps: int = 3

    def validate(self) -> None:
        pass


def toy_method(runs: list):
    """A stand-in method whose run notes what it found in its output folder."""

    def run(cfg, resume):
        record = Path(cfg.output_dir) / stages.RECORD
        runs.append(json.loads(record.read_text()) if record.exists() else None)
        (Path(cfg.output_dir) / "summary.json").write_text("{}")

    module = types.SimpleNamespace(CONFIG=ToyConfig, run=run)
    return {"toy": types.SimpleNamespace(load=lambda: module)}


def test_a_stage_records_before_running_what_its_key_hashes(cache, monkeypatch):
    runs = []
    monkeypatch.setattr(stages, "METHODS", toy_method(runs))
    out = stages.cached_run("toy", ["steps=5"])
    assert len(runs) == 1 and runs[0] is not None  # written before the run, so an interrupted stage has it too
    assert runs[0]["settings"] == {"steps": 5} and runs[0]["source"] == stages.source_fingerprint()
    assert out.name == f"toy-{stages.stage_key(runs[0])}"
    assert stages.cached_run("toy", ["steps=5"]) == out and len(runs) == 1  # reused, not run again
    assert stages.cached_run("toy", ["steps=6"]) != out and len(runs) == 2


def make(path, *files):
    path.mkdir(parents=True)
    for name, text in files:
        (path / name).write_text(text)
    path.with_name(path.name + ".lock").touch()
    return path


def stage(cache, name, source, done=True):
    record = [] if source is None else [(stages.RECORD, json.dumps({"source": source}))]
    return make(cache / "stages" / name, *record, *([("summary.json", "{}")] if done else []))


@pytest.fixture
def filled(cache):
    """One entry of each state; returns {name: path}."""
    tiny, quick = (f"{name}-{EMBEDDED[name].fingerprint()}" for name in ("tiny", "tiny-quick"))
    models = cache / "base-models"
    paths = {
        "base": make(models / tiny, ("config.json", "{}")),
        "base log": make(models / f".{tiny}.work", ("metrics.jsonl", "{}\n")),
        "old base": make(models / "tiny-000000000000", ("config.json", "{}")),
        "unknown base": make(models / "huge-0123456789ab", ("config.json", "{}")),
        "pretraining": make(models / f".{quick}.work", ("metrics.jsonl", "{}\n")),
        "stage": stage(cache, "sft-aaaaaaaaaaaa", stages.source_fingerprint()),
        "interrupted stage": stage(cache, "grpo-bbbbbbbbbbbb", stages.source_fingerprint(), done=False),
        "old stage": stage(cache, "sft-cccccccccccc", "0" * 64),
        "unrecorded stage": stage(cache, "dpo-dddddddddddd", None),
    }
    return paths


def test_listing_names_each_entry_state(filled, capsys):
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[2 if line.startswith("base") else 1]: line for line in out.splitlines()[:-1]}
    assert len(lines) == 8  # a base model's log folder belongs to its entry
    assert lines[filled["base"].name].endswith("current")
    assert lines[filled["pretraining"].name[1:-len(".work")]].endswith("interrupted")
    assert lines["tiny-000000000000"].endswith("stale: built from another base-model config, world or package version")
    assert lines["huge-0123456789ab"].endswith("stale: no base model of that name")
    assert lines["sft-aaaaaaaaaaaa"].endswith("current") and lines["grpo-bbbbbbbbbbbb"].endswith("interrupted")
    assert lines["sft-cccccccccccc"].endswith("stale: built by other source code")
    assert lines["dpo-dddddddddddd"].endswith("stale: built by other source code")
    assert "8 entries" in out.splitlines()[-1] and "4 stale" in out.splitlines()[-1]


def test_prune_removes_the_stale_entries_and_their_locks_only(filled, cache, capsys):
    assert main(["cache", "--prune"]) == 0
    assert "removed 4 of 8 entries" in capsys.readouterr().out
    for name in ("base", "base log", "pretraining", "stage", "interrupted stage"):
        assert filled[name].exists(), name
    for name in ("old base", "unknown base", "old stage", "unrecorded stage"):
        assert not filled[name].exists() and not filled[name].with_name(filled[name].name + ".lock").exists(), name


def test_clear_leaves_an_entry_a_job_builds_and_names_its_builder(filled, cache, capsys):
    running = filled["interrupted stage"]
    with locks.building(running):
        assert main(["cache", "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"kept grpo-bbbbbbbbbbbb: being built by pid {os.getpid()} since " in out and "removed 7 of 8" in out
    assert running.exists() and not locks.holder_path(running).exists()  # the note goes with the lock
    assert not filled["base"].exists() and not filled["base log"].exists() and not filled["stage"].exists()


def test_a_process_using_a_cached_stage_keeps_clear_from_deleting_it(cache, monkeypatch, capsys):
    """cached_run leaves this process holding the stage's shared lock: a clear skips it until it is released."""
    monkeypatch.setattr(stages, "METHODS", toy_method([]))
    out = stages.cached_run("toy", ["steps=5"])
    try:
        assert main(["cache", "--clear"]) == 0
        assert f"kept {out.name}: in use by pid {os.getpid()}" in capsys.readouterr().out
        assert (out / "summary.json").exists()
    finally:
        locks.release(out)
    assert main(["cache", "--clear"]) == 0
    assert "removed 1 of 1" in capsys.readouterr().out and not out.exists()
    assert not list(cache.glob("stages/*")) and not list(cache.glob("stages/.*"))  # lock file and pid note too


READER = """
import sys, time
from pathlib import Path
from posttrain import locks
assert locks.use(Path(sys.argv[1]), lambda: True)
print("using", flush=True)
time.sleep(60)
"""


def test_another_process_using_an_entry_keeps_it_until_it_dies(filled, cache, capsys):
    """The shared lock is the kernel's: killed without any clean-up, the reader no longer pins the entry."""
    entry = filled["base"]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(entry)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "using"
        assert main(["cache", "--clear"]) == 0
        assert f"kept {entry.name}: in use by pid {reader.pid}" in capsys.readouterr().out and entry.exists()
    finally:
        reader.kill()
        reader.wait()
    assert main(["cache", "--clear"]) == 0
    assert not entry.exists() and not locks.reader_paths(entry)


BUILDER = """
import sys, time
from pathlib import Path
from posttrain import locks
with locks.building(Path(sys.argv[1])):
    print("building", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_process_waiting_for_a_build_says_who_holds_the_lock(cache, capsys):
    entry = cache / "stages" / "sft-eeeeeeeeeeee"
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, str(entry), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "building"
        entry.mkdir(parents=True)  # built by the time the lock is released
        started = time.monotonic()
        assert locks.use(entry, entry.exists)  # waits for the builder
        assert time.monotonic() - started > 0.5  # it got the lock only once the builder had finished
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"posttrain: waiting for {entry.name}: pid {builder.pid} since ")
        assert line.endswith(f"holds {entry.name}.lock") and "\n" not in line
    finally:
        builder.kill()
        builder.wait()
        locks.release(entry)


def test_stale_note_counts_the_stale_entries(filled, cache):
    assert stale_note().startswith("the cache holds 4 entries (")
    assert main(["cache", "--prune"]) == 0
    assert stale_note() == ""


def copy_package(to: Path) -> Path:
    """The package's Python files copied under `to`; returns the copy's root."""
    root = Path(stages.posttrain.__file__).parent
    for path in root.rglob("*.py"):
        target = to / "posttrain" / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return to / "posttrain"


def fingerprint_of(root: Path, monkeypatch) -> str:
    monkeypatch.setattr(stages.posttrain, "__file__", str(root / "__init__.py"))
    stages.source_fingerprint.cache_clear()
    try:
        return stages.source_fingerprint()
    finally:
        stages.source_fingerprint.cache_clear()


def test_the_source_fingerprint_ignores_docstrings_and_comments_but_not_code(tmp_path, monkeypatch):
    root = copy_package(tmp_path)
    module = root / "losses" / "dpo.py"
    text = module.read_text(encoding="utf-8")
    before = fingerprint_of(root, monkeypatch)
    assert before == fingerprint_of(copy_package(tmp_path / "again"), monkeypatch)
    edited = text.replace('"""', '"""A reworded docstring. ', 1) + "\n# a new comment\n"
    module.write_text(edited, encoding="utf-8")
    assert fingerprint_of(root, monkeypatch) == before
    module.write_text(edited + "\nEXTRA = 1\n", encoding="utf-8")
    assert fingerprint_of(root, monkeypatch) != before


def test_source_digest_sees_code_not_docstrings_comments_or_layout():
    code = '"""Module."""\n\n\nclass A:\n    """A class."""\n\n    def f(self):\n        """Doc."""\n        return 1  # one\n'
    same = ('"""Another module docstring,\nover two lines."""\n\nclass A:\n    """Reworded."""\n    def f(self):\n'
            '        # a comment\n        """Changed."""\n        return 1\n')
    assert stages.source_digest(code) == stages.source_digest(same)
    assert stages.source_digest(code) != stages.source_digest(code.replace("return 1", "return 2"))
    assert stages.source_digest(code) != stages.source_digest(code.replace("return 1  # one", "x = 'one'\n        return 1"))
    only_doc = 'def g():\n    """Only a docstring."""\n'
    assert stages.source_digest(only_doc) == stages.source_digest('def g():\n    """Reworded."""\n')
