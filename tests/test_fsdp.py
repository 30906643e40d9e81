"""`sharding=fsdp`: FSDP2 over two CPU processes (gloo, torchrun) trains as one process does, saves the same
Hugging Face folder, and resumes from its gathered checkpoint; one process ignores it; a bad value is one line.

SFT and DPO (with LoRA adapters sharded inside their decoder layers) follow the single process's loss and
gradient-norm curves and end with its weights. GRPO's and PPO's ranks sample their own prompts, so two processes
never equal one: their sharded runs equal the two-process DDP runs instead, sampling and measuring on the gathered
policy (PPO's value head sharded beside it).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from posttrain import cli, lora, sharding
from posttrain.errors import UserError
from posttrain.onpolicy import check_sharding_wired
from tests.conftest import random_model
from tests.test_distributed import dpo_data, grad_norms, losses, sft_data

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "posttrain"]


def torchrun(args, out):
    launched = subprocess.run([*TORCHRUN, *args, "--output-dir", str(out)], capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]


def weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_weights(one, two, atol):
    first, second = weights(one), weights(two)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=atol, msg=name)


def assert_same_curves(one, two):
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert grad_norms(two) == pytest.approx(grad_norms(one), rel=1e-4)


def resume_from_checkpoint_of(run_dir, args, out):
    """A fresh folder holding only `run_dir`'s kept checkpoint, as a killed run leaves it, resumed there."""
    out.mkdir()
    shutil.copytree(run_dir / "checkpoint", out / "checkpoint")
    torchrun([*args, "--resume"], out)


def test_a_bad_sharding_value_stops_in_one_line(tmp_path, tiny_model_dir, capsys):
    args = ["sft", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"), "sharding=zero3",
            "--output-dir", str(tmp_path / "run")]
    assert cli.main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "'sharding'" in lines[0] and "ddp, fsdp" in lines[0] and "zero3" in lines[0]


def test_one_process_ignores_fsdp_and_runs_as_before(tmp_path, tiny_model_dir):
    data = sft_data(tmp_path / "train.jsonl")
    args = ["sft", "--model", str(tiny_model_dir), "--data", data, "steps=3", "batch_size=8", "log_every=1"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "ddp")]) == 0
    assert cli.main([*args, "sharding=fsdp", "--output-dir", str(tmp_path / "fsdp")]) == 0
    plain, sharded = ((tmp_path / run / "metrics.jsonl").read_text() for run in ("ddp", "fsdp"))
    assert sharded == plain
    assert not sharding.active(SimpleNamespace(sharding="fsdp"), SimpleNamespace(num_processes=1))


def test_decoder_layers_are_the_models_no_split_modules_with_their_adapters(tokenizer):
    model = random_model(tokenizer, layers=3)
    lora.inject(model, ["q_proj", "v_proj"], 4, 8, seed=0)
    layers = sharding.decoder_layers(model)
    assert layers == list(model.model.layers) and len(layers) == 3
    assert any(p.requires_grad for p in layers[0].parameters())  # the adapters are sharded with their layer


def test_a_method_that_does_not_shard_refuses_fsdp_on_several_processes():
    run = SimpleNamespace(name="my-method", cfg=SimpleNamespace(sharding="fsdp"), model=torch.nn.Linear(2, 2),
                          accelerator=SimpleNamespace(num_processes=2))
    with pytest.raises(UserError, match="sharding=fsdp is not available for my-method"):
        check_sharding_wired(run)
    run.accelerator.num_processes = 1
    check_sharding_wired(run)


def test_sharded_sft_matches_one_process_and_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    """A checkpoint after step 4 of 6, kept: the sharded run gathers weights and AdamW's state whole into it, and
    a resumed run shards them back and ends where the uninterrupted one did."""
    args = ["sft", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"), "steps=6",
            "batch_size=8", "log_every=1", "lr=3e-3", "warmup_steps=1", "sharding=fsdp", "checkpoint_every=4"]
    single, sharded, resumed = tmp_path / "single", tmp_path / "sharded", tmp_path / "resumed"
    assert cli.main([*args, "--output-dir", str(single)]) == 0
    torchrun([*args, "keep_checkpoint=true"], sharded)
    assert_same_curves(single, sharded)
    assert losses(single)[-1] < losses(single)[0]
    assert_same_weights(single, sharded, atol=1e-5)
    assert json.loads((sharded / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((sharded / "checkpoint" / "state.json").read_text())["step"] == 4
    resume_from_checkpoint_of(sharded, args, resumed)
    assert [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()] == [5, 6]
    assert_same_weights(sharded, resumed, atol=1e-6)


def test_a_sigterm_to_a_sharded_run_saves_one_checkpoint_that_resumes(tmp_path, tiny_model_dir):
    """SIGTERM to torchrun's whole process group, as a job scheduler sends it: the ranks agree to stop after the
    same step, gather its checkpoint together, and the resumed run follows the one-process run's curve."""
    steps = 100
    args = ["sft", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"), f"steps={steps}",
            "batch_size=8", "log_every=1", "lr=1e-3", "warmup_steps=1", "sharding=fsdp"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli.main([*args, "--output-dir", str(single)]) == 0
    proc = subprocess.Popen([*TORCHRUN, *args, "--output-dir", str(sharded)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=os.setpgrp)  # its own process group
    deadline = time.time() + 120
    while len(logged_steps(sharded)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    saved = json.loads((sharded / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= saved < steps and logged_steps(sharded)[-1] == saved, err[-3000:]
    assert f"interrupted (SIGTERM) after step {saved}; checkpoint saved" in err
    torchrun([*args, "--resume"], sharded)
    assert logged_steps(sharded) == list(range(1, steps + 1))
    assert losses(sharded)[saved:] == pytest.approx(losses(single)[saved:], rel=1e-3)


def logged_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sharded_dpo_with_lora_matches_one_process(tmp_path, tiny_model_dir):
    args = ["dpo", "--model", str(tiny_model_dir), "--data", dpo_data(tmp_path / "pairs.jsonl"), "steps=5",
            "batch_size=8", "log_every=1", "lr=1e-3", "warmup_steps=1", "eval_every=0", "beta=0.5", "lora_r=4",
            "sharding=fsdp"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli.main([*args, "--output-dir", str(single)]) == 0
    torchrun(args, sharded)
    assert_same_curves(single, sharded)
    assert_same_weights(single, sharded, atol=1e-5)
    assert (sharded / "adapter" / "adapter_model.safetensors").exists()


def test_sharded_distillation_with_its_teacher_sharded_matches_one_process(tmp_path, tiny_model_dir, tokenizer):
    """Every student sharded, and the teacher too once its completions are sampled: its forwards on the soft-target
    and on-policy students' rows are collectives every rank runs."""
    teacher = tmp_path / "teacher"
    random_model(tokenizer, seed=1, hidden=64).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    args = ["distill", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"),
            f"teacher={teacher}", "steps=4", "batch_size=8", "log_every=1", "lr=3e-3", "warmup_steps=1",
            "sample_every=2", "sharding=fsdp"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli.main([*args, "--output-dir", str(single)]) == 0
    torchrun(args, sharded)
    for kind in ("sft", "seq_kd", "soft_kd", "on_policy"):
        assert_same_curves(single / kind / "seed0", sharded / kind / "seed0")
    summaries = [json.loads((run / "summary.json").read_text())["metrics"]["teacher"] for run in (single, sharded)]
    assert summaries[1]["params"] == summaries[0]["params"]  # counted whole from the sharded teacher


VOWELS = '''
def vowels(prompts, completions, answers, **columns):
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''


def rl_args(method: str, tmp_path, model_dir) -> list[str]:
    """`method` on prompts with a reward that differs between a random model's completions, so the updates move
    the weights; a held-out measurement at step 2, a checkpoint every 2 rollout batches."""
    prompts, reward = tmp_path / "prompts.jsonl", tmp_path / "reward.py"
    prompts.write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}\n", "answer": str(a + b)}) + "\n"
                               for a in range(1, 6) for b in range(1, 6)))
    reward.write_text(VOWELS)
    per_prompt = "num_generations=4" if method == "grpo" else "samples_per_prompt=4"
    return [method, "--model", str(model_dir), "--data", str(prompts), f"reward={reward}:vowels", "steps=3",
            "prompts_per_step=4", per_prompt, "batch_size=8", "eval_every=2", "eval_problems=4", "kl_problems=4",
            "max_new_tokens=12", "lr=1e-3", "warmup_steps=0", "checkpoint_every=2"]


def test_sharded_grpo_equals_two_process_ddp_and_resumes(tmp_path, tiny_model_dir):
    """Every rollout batch and held-out measurement samples from the gathered policy."""
    args = rl_args("grpo", tmp_path, tiny_model_dir)
    ddp, sharded, resumed = tmp_path / "ddp", tmp_path / "sharded", tmp_path / "resumed"
    torchrun(args, ddp)
    torchrun([*args, "sharding=fsdp", "keep_checkpoint=true"], sharded)
    assert_same_curves(ddp, sharded)
    assert logged_kl(sharded) == pytest.approx(logged_kl(ddp), rel=1e-4) and logged_kl(sharded)[-1] > 0
    assert_same_weights(ddp, sharded, atol=1e-5)
    resume_from_checkpoint_of(sharded, [*args, "sharding=fsdp"], resumed)
    assert_same_weights(sharded, resumed, atol=1e-6)


def test_sharded_ppo_with_its_value_head_equals_two_process_ddp_and_resumes(tmp_path, tiny_model_dir):
    """The value head is sharded beside the policy (its own FSDP2 unit), in the checkpoint and gathered whole
    into value_head.safetensors."""
    args = rl_args("ppo", tmp_path, tiny_model_dir)
    ddp, sharded, resumed = tmp_path / "ddp", tmp_path / "sharded", tmp_path / "resumed"
    torchrun(args, ddp)
    torchrun([*args, "sharding=fsdp", "keep_checkpoint=true"], sharded)
    assert_same_curves(ddp, sharded)
    assert_same_weights(ddp, sharded, atol=1e-5)
    heads = [load_file(str(run / "model" / "value_head.safetensors")) for run in (ddp, sharded)]
    torch.testing.assert_close(heads[1], heads[0], rtol=0, atol=1e-5)
    assert heads[0]["linear.weight"].abs().sum() > 0  # it trained (it starts at 0)
    resume_from_checkpoint_of(sharded, [*args, "sharding=fsdp"], resumed)
    assert_same_weights(sharded, resumed, atol=1e-6)
    resumed_head = load_file(str(resumed / "model" / "value_head.safetensors"))
    torch.testing.assert_close(resumed_head, heads[1], rtol=0, atol=1e-6)


def logged_kl(run_dir):
    return [json.loads(line)["kl"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
