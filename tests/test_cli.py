"""Front doors and bad input: every user mistake is one line naming what is wrong, exit code 2."""
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from posttrain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_lines(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_help_lists_categories_and_methods(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("fine-tuning", "rl", "test-time", "sft", "lora", "dpo", "ppo", "grpo", "best-of-n", "cot-prompt"):
        assert word in out


def test_runner_script_help_lists_methods():
    out = subprocess.run([sys.executable, str(ROOT / "run_all_demonstrations.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--category" in out and "--method" in out and "--quick" in out and "best-of-n" in out


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path, tiny_model_dir):
    data = write_lines(tmp_path / "bad.jsonl", '{"prompt": "a", "completion": "b"}', '{"prompt": "a", ')
    code, _, err = run_cli(capsys, "sft", "--data", data, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "bad.jsonl:2", "invalid JSON")


def test_missing_field_names_file_line_and_field(capsys, tmp_path, tiny_model_dir):
    data = write_lines(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}', '{"prompt": "a"}')
    code, _, err = run_cli(capsys, "sft", "--data", data, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "d.jsonl:2", "completion")


def test_empty_dataset(capsys, tmp_path, tiny_model_dir):
    data = write_lines(tmp_path / "empty.jsonl", "")
    code, _, err = run_cli(capsys, "sft", "--data", data, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "empty.jsonl", "no records")


def test_unknown_config_key_lists_valid_keys(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sft", "stepz=50", "--output-dir", str(tmp_path))
    assert_one_line_error(code, err, "stepz", "did you mean 'steps'", "batch_size")


def test_bad_config_value(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sft", "steps=many", "--output-dir", str(tmp_path))
    assert_one_line_error(code, err, "steps", "many")


def test_model_path_that_does_not_exist(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sft", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "missing", "does not exist")


def test_overrides_may_sit_between_options(capsys):
    code, out, _ = run_cli(capsys, "sft", "lr=1e-4", "--quick", "steps=9", "--show-config", "batch_size=4")
    resolved = json.loads(out)
    assert code == 0 and (resolved["lr"], resolved["steps"], resolved["batch_size"]) == (1e-4, 9, 4)
    with pytest.raises(SystemExit) as exited:
        main(["report", "runs/x", "steps=9"])  # a command without config keys
    assert exited.value.code == 2


def test_show_config_applies_yaml_then_overrides(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.01\nsteps: 7\n")
    code, out, _ = run_cli(capsys, "sft", "--config", str(cfg), "steps=9", "--show-config")
    resolved = json.loads(out)
    assert code == 0 and resolved["lr"] == 0.01 and resolved["steps"] == 9


def test_sft_on_user_jsonl_writes_the_contract(capsys, tmp_path, tiny_model_dir):
    rows = [json.dumps({"prompt": f"Q: {i}+1\n", "completion": f"A: {i + 1}"}) for i in range(20)]
    rows.append(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A: 1"}]}))
    data = write_lines(tmp_path / "train.jsonl", *rows[:-1])
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "sft", "--data", data, "--model", str(tiny_model_dir), "--output-dir", str(out),
                              "steps=4", "batch_size=4")
    assert code == 0 and "held-out NLL" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sft" and summary["config"]["data"] == data
    assert 0 <= summary["metrics"]["accuracy"] <= 1 and summary["baseline"]["n"] == 2
    assert (out / "model" / "model.safetensors").exists() and (out / "training_curve.png").exists()
    before, after = (f"{summary[k]['heldout_nll']:.3f}" for k in ("baseline", "metrics"))
    assert f"sft: held-out NLL {before} -> {after} (" in stdout  # three decimals, not the float's seventeen

    chat = write_lines(tmp_path / "chat.jsonl", *rows)  # messages need a chat template, which this model lacks
    code, _, err = run_cli(capsys, "sft", "--data", chat, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "c"))
    assert_one_line_error(code, err, "chat template")


def test_console_script_exit_code_is_2_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "posttrain", "sft", "nonsense_key=1"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "nonsense_key" in proc.stderr


def test_a_methods_help_lists_its_config_keys_with_defaults_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: posttrain distill")
    assert "\n  sample_every: int = 5  # the on-policy student samples its rows" in out
    assert "\n  steps: int = 150  # optimizer steps" in out  # a default of the method, the meaning from the base config


def test_data_is_offered_exactly_where_a_method_reads_records(capsys):
    """A method whose config has a `data` key takes --data (its help names the records); the others, which
    compare what only the world can vary, do not offer it."""
    from posttrain.methods import METHODS

    for method in METHODS.values():
        assert bool(method.data) == ("data" in {f.name for f in fields(method.load().CONFIG)}), method.name
    with pytest.raises(SystemExit) as exit_info:
        main(["cot-ft", "--data", "x.jsonl"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    assert "prompt/answer records (answers compared by value), instead of the world's problems" in " ".join(
        capsys.readouterr().out.split())


def test_ctrl_c_outside_a_training_loop_is_one_line_and_exit_130(capsys, monkeypatch):
    from posttrain.methods.test_time import self_consistency

    def interrupted(cfg, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(self_consistency, "run", interrupted)
    code, _, err = run_cli(capsys, "self-consistency", "--quick")
    assert code == 130 and err.strip() == "interrupted; no checkpoint was saved at this point, so run the command again"
