"""Tests for posttrain.io: atomic writes, NaN handling, JSONL resume truncation, atomic_dir."""

from __future__ import annotations

import json
import math
import os

import pytest

from posttrain.errors import UserError
from posttrain.io import JsonlWriter, atomic_dir, read_json, write_bytes, write_json, write_text


def test_write_json_roundtrip_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "out.json"  # parent is created
    write_json(path, {"a": [1, 2], "t": (3, 4)})
    assert read_json(path) == {"a": [1, 2], "t": [3, 4]}
    assert path.read_text().startswith("{\n  ")  # indent=2
    assert os.listdir(path.parent) == ["out.json"]


def test_write_json_replaces_non_finite_floats(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"loss": math.nan, "xs": [math.inf, 1.5], "n": {"v": -math.inf}})
    assert json.loads(path.read_text()) == {"loss": None, "xs": [None, 1.5], "n": {"v": None}}


def test_failed_write_keeps_old_content(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert read_json(path) == {"ok": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_write_text_and_bytes(tmp_path):
    write_text(tmp_path / "a.txt", "héllo\n")
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin"]


def test_written_files_get_normal_permissions(tmp_path):
    path = tmp_path / "p.txt"
    write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_read_json_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found: .*missing.json"):
        read_json(tmp_path / "missing.json")


def test_read_json_invalid_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(UserError) as info:
        read_json(path)
    assert str(info.value).startswith(f"{path}:4: invalid JSON (")


def test_jsonl_writer_appends_and_flushes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with JsonlWriter(path) as writer:
        writer.log({"step": 1, "loss": 0.5})
        assert path.read_text() == '{"step": 1, "loss": 0.5}\n'  # visible before close
        writer.log({"step": 2, "loss": math.nan})
    with JsonlWriter(path) as writer:
        writer.log({"step": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": None}, {"step": 3}]


def test_jsonl_writer_resume_drops_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"note": "header"}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # crash mid-line
    with JsonlWriter(path, resume_step=2) as writer:
        writer.log({"step": 3, "again": True})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1}, {"note": "header"}, {"step": 2}, {"step": 3, "again": True}]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_jsonl_writer_resume_without_file(tmp_path):
    with JsonlWriter(tmp_path / "new.jsonl", resume_step=5) as writer:
        writer.log({"step": 6})
    assert (tmp_path / "new.jsonl").read_text() == '{"step": 6}\n'


def test_atomic_dir_creates(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        assert tmp.is_dir() and tmp != final and not final.exists()
        (tmp / "weights.bin").write_bytes(b"w")
    assert (final / "weights.bin").read_bytes() == b"w"
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_dir_replaces_existing(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with atomic_dir(final) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert os.listdir(final) == ["new.bin"]
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_dir_failure_keeps_old_and_cleans_up(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert os.listdir(final) == ["old.bin"]
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_dir_failure_without_existing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model"):
            raise RuntimeError
    assert os.listdir(tmp_path) == []
