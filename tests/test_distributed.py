"""Several processes through torchrun (gloo on the CPU): the same global batch gives the same run.

Each rank takes every second row of the global batch and DDP averages the gradients, so with
equal-length rows two processes follow the single-process loss curve step for step.
"""
import json
import subprocess
import sys

import pytest


def sft_data(path):
    rows = [{"prompt": f"Q: {a}+{b}\n", "completion": f"A: {a + b}"} for a in range(5, 10) for b in range(5, 10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # every row the same length
    return str(path)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nproc", [2])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model_dir, nproc):
    data = sft_data(tmp_path / "train.jsonl")
    args = ["-m", "posttrain", "sft", "--model", str(tiny_model_dir), "--data", data,
            "steps=6", "batch_size=8", "log_every=1", "lr=3e-3", "warmup_steps=1"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, *args, "--output-dir", str(single)], check=True, capture_output=True)
    multi = tmp_path / "multi"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
         *args, "--output-dir", str(multi)], capture_output=True, text=True,
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert losses(multi) == pytest.approx(losses(single), rel=1e-4)
    assert losses(single)[-1] < losses(single)[0]
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["metrics"]["n"] == json.loads((single / "summary.json").read_text())["metrics"]["n"]
