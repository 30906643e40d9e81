"""GRPO and PPO resume: killed mid-run (SIGKILL, after a periodic checkpoint) or interrupted (Ctrl-C), then
`--resume`, they end with the weights and metrics of the uninterrupted run."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from posttrain import cli

# A reward that varies between completions of a random model (so the updates move the weights), slow enough
# that the killed run is still going when its first checkpoints exist.
REWARD = '''
import time

def vowels(prompts, completions, answers, **columns):
    time.sleep(0.2)
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''
STEPS = 6


@pytest.fixture
def run_args(tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}\n", "answer": str(a + b)}) + "\n"
                            for a in range(1, 6) for b in range(1, 6)))
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)

    def args(method: str, out) -> list[str]:
        samples = "num_generations=4" if method == "grpo" else "samples_per_prompt=2"
        return [method, "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                f"reward={reward}:vowels", f"steps={STEPS}", "prompts_per_step=4", samples, "batch_size=8",
                "max_new_tokens=12", "eval_every=2", "eval_problems=4", "kl_problems=4", "checkpoint_every=1",
                "lr=1e-3", "warmup_steps=0"]
    return args


def final_state(out) -> tuple[dict, list, dict]:
    summary = json.loads((out / "summary.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, logged, load_file(str(out / "model" / "model.safetensors"))


def assert_same_run(resumed, uninterrupted):
    summary, logged, weights = final_state(resumed)
    summary0, logged0, weights0 = final_state(uninterrupted)
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    for key in ("loss", "lr"):
        assert [m.get(key) for m in logged] == pytest.approx([m.get(key) for m in logged0], rel=1e-5)
    frontier, frontier0 = summary["metrics"]["frontier"], summary0["metrics"]["frontier"]
    assert [p["step"] for p in frontier] == [p["step"] for p in frontier0] == [0, 2, 4, 6]
    assert [p["kl"] for p in frontier] == pytest.approx([p["kl"] for p in frontier0], rel=1e-5)
    assert summary["metrics"]["accuracy"] == summary0["metrics"]["accuracy"]
    assert weights.keys() == weights0.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], weights0[name], rtol=1e-5, atol=1e-6)
    assert not (resumed / "checkpoint").exists()  # removed once the run finished


def wait_for_checkpoint(out, step: int, process, timeout: float = 120.0) -> None:
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} while the run was going (exit {process.poll()})")


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_killed_then_resumed_ends_as_the_uninterrupted_run(tmp_path, run_args, method):
    uninterrupted, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli.main(run_args(method, uninterrupted)) == 0
    process = subprocess.Popen([sys.executable, "-m", "posttrain", *run_args(method, killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(killed, 2, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["step"] < STEPS
    assert cli.main([*run_args(method, killed), "--resume"]) == 0
    assert_same_run(killed, uninterrupted)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, run_args, monkeypatch, capsys):
    from posttrain.methods.rl import grpo

    uninterrupted, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert cli.main(run_args("grpo", uninterrupted)) == 0
    optimise, calls = grpo.optimise, []

    def interrupted_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return optimise(*args, **kwargs)

    monkeypatch.setattr(grpo, "optimise", interrupted_at_third)
    assert cli.main([*run_args("grpo", interrupted), "checkpoint_every=0"]) == 130
    assert "after rollout batch 2; checkpoint saved" in capsys.readouterr().err
    monkeypatch.setattr(grpo, "optimise", optimise)
    assert json.loads((interrupted / "checkpoint" / "state.json").read_text())["step"] == 2
    assert cli.main([*run_args("grpo", interrupted), "--resume"]) == 0
    assert_same_run(interrupted, uninterrupted)


def test_resume_without_a_checkpoint_says_so(tmp_path, run_args, capsys):
    assert cli.main([*run_args("grpo", tmp_path / "fresh"), "--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
