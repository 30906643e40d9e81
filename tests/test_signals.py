"""A training run stopped by a signal, as a person (Ctrl-C: SIGINT) or a job scheduler or `kill` (SIGTERM) stops
it: the CLI saves a checkpoint holding the last finished step, writes that step's metrics, exits with 128 + the
signal's number and one line, and the same command with `--resume` finishes the run."""
import json
import signal
import subprocess
import sys
import time

import pytest

STEPS = 1000


def write_data(path):
    rows = [{"prompt": f"Q: {a}+{b}\n", "completion": f"A: {a + b}"} for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def metric_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, tiny_model_dir, signum):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "posttrain", "sft", "--model", str(tiny_model_dir), "--data",
            str(write_data(tmp_path / "data.jsonl")), "--output-dir", str(out), f"steps={STEPS}", "batch_size=4",
            "warmup_steps=1", "log_every=7", "variants=plain"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(metric_steps(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]

    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"interrupted ({name}) after step")
    saved = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 14 <= saved < STEPS
    assert metric_steps(out)[-1] == saved  # the step the checkpoint ends with has its metrics

    done = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "summary.json").exists() and not (out / "checkpoint").exists()
    assert metric_steps(out)[-1] == STEPS and len(set(metric_steps(out))) == len(metric_steps(out))


def test_a_demonstration_worker_takes_sigterm_as_ctrl_c():
    """The demonstration's stages run in worker processes; a SIGTERM forwarded to one must stop its stage as
    Ctrl-C does (checkpoint saved), not kill it where it stands."""
    script = ("import os, signal, time\n"
              "from posttrain.demo import _worker_init\n"
              "_worker_init(1)\n"
              "try:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "except KeyboardInterrupt as exc:\n"
              "    print('interrupted', exc.signum)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["interrupted", str(int(signal.SIGTERM))]
