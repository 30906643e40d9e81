"""A full disk: a model or checkpoint save without room is refused in one line before anything is written, a
disk that fills up during a write is the same one line, and the last good checkpoint stays as it was."""
import errno
import json
import shutil
from pathlib import Path

import pytest

import posttrain.io as io
import posttrain.training as training
from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.forward import causal_lm_loss
from posttrain.methods.common import save_model
from posttrain.training import save_checkpoint, train
from tests.conftest import random_model
from tests.test_training import config, dataset

MIB = 2**20


def free_space(monkeypatch, *free: int) -> None:
    """shutil.disk_usage reports `free` bytes free on its successive calls (the last one from then on)."""
    answers = list(free)

    def disk_usage(path):
        value = answers.pop(0) if len(answers) > 1 else answers[0]
        return shutil._ntuple_diskusage(10**12, 10**12 - value, value)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


@pytest.fixture
def checkpointed(tokenizer, tmp_path):
    """(model, optimizer, scheduler, checkpoint folder) with a good checkpoint saved after 10 steps."""
    model = random_model(tokenizer)
    train(model, dataset(tokenizer).batch, causal_lm_loss, config(steps=10, checkpoint_every=10, keep_checkpoint=True),
          tmp_path)
    optimizer = training.make_optimizer([p for p in model.parameters() if p.requires_grad], config())
    scheduler = training.torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_lambda(config()))
    return model, optimizer, scheduler, tmp_path / "checkpoint"


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.parent.rglob("*")) if p.is_file() and "metrics" not in p.name}


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_checkpoint_without_room_is_refused_before_writing(checkpointed, monkeypatch):
    model, optimizer, scheduler, ckpt = checkpointed
    before = snapshot(ckpt)
    needed = training.state_bytes(model.state_dict())
    free_space(monkeypatch, needed)  # the weights alone, without the optimizer's state or the margin
    with pytest.raises(UserError) as raised:
        save_checkpoint(ckpt, model, optimizer, scheduler, 20)
    assert_one_line(raised, "not enough disk space for a checkpoint in", "MiB free", "posttrain cache --prune",
                    f"{ckpt} was left as it was")
    assert snapshot(ckpt) == before and json.loads((ckpt / "state.json").read_text()) == {"step": 10}


def test_a_model_without_room_is_refused_and_nothing_is_written(tokenizer, tmp_path, monkeypatch):
    free_space(monkeypatch, 3 * MIB)
    with pytest.raises(UserError) as raised:
        save_model(random_model(tokenizer), tokenizer, tmp_path / "model")
    assert_one_line(raised, "not enough disk space for the model", "about 16 MiB needed, 3 MiB free",
                    "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_enospc_from_the_writer_is_one_line_and_keeps_the_last_checkpoint(checkpointed, monkeypatch):
    model, optimizer, scheduler, ckpt = checkpointed
    before = snapshot(ckpt)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "save_file", full)
    with pytest.raises(UserError) as raised:
        save_checkpoint(ckpt, model, optimizer, scheduler, 20)
    assert_one_line(raised, "the disk filled up while writing a checkpoint", f"{ckpt} was left as it was")
    assert snapshot(ckpt) == before  # no partial .tmp folder beside it either


def test_a_librarys_own_error_on_a_full_disk_is_the_same_line(checkpointed, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... unexpected pos ...'): read as a full disk when the
    disk has (almost) no room left at that moment."""
    model, optimizer, scheduler, ckpt = checkpointed
    before = snapshot(ckpt)

    def unexpected_pos(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 2048 vs 1960")

    monkeypatch.setattr(training.torch, "save", unexpected_pos)
    free_space(monkeypatch, 10**10, MIB)  # room before the write, none once it failed
    with pytest.raises(UserError) as raised:
        save_checkpoint(ckpt, model, optimizer, scheduler, 20)
    assert_one_line(raised, "the disk filled up while writing a checkpoint")
    assert snapshot(ckpt) == before


def test_a_librarys_error_with_room_left_stays_a_crash(checkpointed, monkeypatch):
    model, optimizer, scheduler, ckpt = checkpointed

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(training.torch, "save", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint(ckpt, model, optimizer, scheduler, 20)


def test_a_file_write_out_of_space_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(UserError) as raised:
        io.write_json(tmp_path / "summary.json", {"a": 1})
    assert_one_line(raised, f"no space left on the disk to write {tmp_path / 'summary.json'}")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_exits_2_with_one_line_when_the_model_does_not_fit(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = tmp_path / "train.jsonl"
    rows = [json.dumps({"prompt": f"Q: {i}+1\n", "completion": f"A: {i + 1}"}) for i in range(10)]
    data.write_text("\n".join(rows) + "\n")
    free_space(monkeypatch, MIB)
    code = main(["sft", "--data", str(data), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                 "steps=2", "batch_size=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]  # progress bars, then the error
    assert code == 2 and [line for line in err if line.startswith("error: ")] == err[-1:]
    assert err[-1].startswith("error: not enough disk space for the model") and "Traceback" not in "".join(err)
    assert not (tmp_path / "run" / "model").exists()
