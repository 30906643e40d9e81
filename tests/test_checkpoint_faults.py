"""Faults around checkpoints and output folders: a damaged or foreign checkpoint is refused in one line and left
as it is, a checkpoint write killed part-way is recovered, a finished run leaves no checkpoint behind, and an
output folder that cannot be written is refused before any model loads."""
import json
import os
import types
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.forward import causal_lm_loss
from posttrain.io import atomic_dir, recover_dir
from posttrain.methods.common import prepare_output, write_summary
from posttrain.training import train
from tests.conftest import random_model
from tests.test_training import config, dataset


@pytest.fixture
def checkpointed(tokenizer, tmp_path):
    """An output folder whose checkpoint was saved after 10 of 30 steps."""
    train(random_model(tokenizer), dataset(tokenizer).batch, causal_lm_loss, config(steps=10, checkpoint_every=10),
          tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def resume(tokenizer, out: Path, model=None):
    model = model if model is not None else random_model(tokenizer, seed=1)
    return train(model, dataset(tokenizer).batch, causal_lm_loss, config(), out, resume=True)


def damage_truncated_weights(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def damage_garbage_optimizer(ckpt: Path) -> None:
    (ckpt / "optimizer.pt").write_bytes(os.urandom(4096))


def damage_malicious_optimizer(ckpt: Path) -> None:
    torch.save({"optimizer": types.SimpleNamespace(run=print), "scheduler": {}}, ckpt / "optimizer.pt")


def damage_step_count(ckpt: Path) -> None:
    (ckpt / "state.json").write_text("{}")


@pytest.mark.parametrize("damage", [damage_truncated_weights, damage_garbage_optimizer, damage_malicious_optimizer,
                                    damage_step_count])
def test_a_damaged_checkpoint_is_refused_in_one_line_and_left_as_it_is(tokenizer, checkpointed, damage):
    ckpt = checkpointed / "checkpoint"
    damage(ckpt)
    before = snapshot(ckpt)
    with pytest.raises(UserError, match="checkpoint file .*cannot be read") as info:
        resume(tokenizer, checkpointed)
    assert "\n" not in str(info.value)
    assert snapshot(ckpt) == before


def test_another_models_checkpoint_is_refused_in_one_line(tokenizer, checkpointed):
    ckpt = checkpointed / "checkpoint"
    before = snapshot(ckpt)
    wider = random_model(tokenizer, hidden=64)
    with pytest.raises(UserError, match="does not match this model") as info:
        resume(tokenizer, checkpointed, wider)
    assert "\n" not in str(info.value) and snapshot(ckpt) == before


def test_a_kill_during_a_checkpoint_write_leaves_nothing_behind_on_the_next_start(tokenizer, checkpointed):
    partial = checkpointed / ".checkpoint.tmp-0123abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    resume(tokenizer, checkpointed)
    assert not partial.exists()


def test_a_kill_between_the_two_renames_resumes_from_the_moved_aside_checkpoint(tokenizer, checkpointed):
    (checkpointed / "checkpoint").rename(checkpointed / ".checkpoint.old-0123abcd")
    result = resume(tokenizer, checkpointed)
    assert result.history[0]["step"] == 15  # resumed after step 10, not from the start
    assert not list(checkpointed.glob(".checkpoint.*"))


def test_recover_dir_drops_an_old_copy_beside_a_complete_folder(tmp_path):
    final = tmp_path / "checkpoint"
    with atomic_dir(final) as tmp:
        (tmp / "state.json").write_text("new")
    (tmp_path / ".checkpoint.old-0123abcd").mkdir()
    recover_dir(final)
    assert (final / "state.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["checkpoint"]


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_run_removes_its_checkpoints_unless_asked_to_keep_them(tokenizer, checkpointed, keep):
    (checkpointed / "variants" / "l2sp-0.01" / "checkpoint").mkdir(parents=True)
    cfg = config(keep_checkpoint=keep)
    write_summary(checkpointed, "sft", cfg, {}, {}, random_model(tokenizer), None)
    assert [p.name for p in checkpointed.rglob("checkpoint")] == (["checkpoint"] * 2 if keep else [])
    if not keep:
        prepare_output(str(checkpointed), resume=False)  # the same command again: not "an interrupted run"


@pytest.mark.parametrize("output_dir", ["/proc/posttrain-run", "/sys/posttrain-run"])
def test_an_unwritable_output_dir_is_one_line_before_any_model_loads(capsys, output_dir):
    code = main(["sft", "--model", "/no/such/model", "--output-dir", output_dir])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert output_dir in err and "cannot be created or written" in err


def test_no_empty_output_folder_is_left_by_a_model_error(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["sft", "--model", str(tmp_path / "missing-model"), "--output-dir", str(out)]) == 2
    assert "missing-model" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("text,problem", [("{}", "'metrics' should be an object"), ("{\"metrics\": ", "invalid JSON"),
                                          ("[1, 2]", "a JSON object"), (b"\xff\xfe", "not UTF-8")])
def test_report_on_a_corrupt_summary_names_the_file_in_one_line(capsys, tmp_path, text, problem):
    (tmp_path / "sft").mkdir()
    summary = tmp_path / "sft" / "summary.json"
    summary.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(summary) in err and problem in err


def test_report_on_a_corrupt_run_json_is_one_line(capsys, tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "summary.json").write_text(json.dumps({"metrics": {}, "baseline": {}}))
    (tmp_path / "run.json").write_text("{")
    assert main(["report", str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err
