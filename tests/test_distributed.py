"""Several processes through torchrun (gloo on the CPU): the same global batch gives the same run.

Each rank takes every second row of the global batch, weights its loss by its share of the global
batch's labelled tokens (or pairs) and DDP averages the gradients, so two processes follow the
single-process loss curve step for step (SFT, on rows of different lengths; DPO).
GRPO and PPO shard each step's prompts across the ranks instead: every rank samples its own rollouts, and
one update on them equals the single process's on all of them.
"""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain import cli
from posttrain.rollouts import rank_share
from tests import rl_update_script
from tests.conftest import random_model


def sft_data(path):
    """Answers of one and two digits: the ranks' shares of a batch hold different numbers of labelled tokens."""
    rows = [{"prompt": f"Q: {a}+{b}\n", "completion": f"A: {a + b}"} for a in range(2, 8) for b in range(2, 8)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def dpo_data(path):
    """Pairs whose chosen and rejected completions all have the same length (sums 10..18 vs 11..19)."""
    rows = [{"prompt": f"Q: {a}+{b}\n", "chosen": f"A: {a + b}", "rejected": f"A: {a + b + 1}"}
            for a in range(5, 10) for b in range(5, 10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def logged(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return logged(run_dir, "loss")


def grad_norms(run_dir):
    return logged(run_dir, "grad_norm")


def run_single_and_torchrun(tmp_path, args, nproc=2):
    """`args` ("-m", "posttrain", method, ...) run in this process and on `nproc` processes under torchrun. The
    single run stays in this process: a new one spends most of such a short run importing torch and transformers."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert args[:2] == ["-m", "posttrain"]
    assert cli.main([*args[2:], "--output-dir", str(single)]) == 0
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
         *args, "--output-dir", str(multi)], capture_output=True, text=True,
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    return single, multi


@pytest.mark.parametrize("logits", ["loss_logits_mb=1024", "loss_logits_mb=0.002 grad_accum=2"],
                         ids=["whole", "chunked-accumulated"])
def test_sft_on_two_processes_matches_one_with_the_same_global_batch(tmp_path, tiny_model_dir, logits):
    """Also with the loss's logits built two rows at a time (`ChunkedCrossEntropy`), which reads the tied output
    weight outside the model's forward, and two micro-batches a rank, the first without DDP's reduction:
    DDP still averages every gradient once."""
    args = ["-m", "posttrain", "sft", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"),
            "steps=6", "batch_size=8", "log_every=1", "lr=3e-3", "warmup_steps=1", *logits.split()]
    single, multi = run_single_and_torchrun(tmp_path, args)
    assert losses(multi) == pytest.approx(losses(single), rel=1e-4)
    assert grad_norms(multi) == pytest.approx(grad_norms(single), rel=1e-4)
    assert logged(multi, "tokens") == logged(single, "tokens")  # the step's labelled tokens, over both ranks
    assert losses(single)[-1] < losses(single)[0]
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["metrics"]["n"] == json.loads((single / "summary.json").read_text())["metrics"]["n"]


@pytest.mark.parametrize("adapters", ["lora_r=0", "lora_r=4"], ids=["full", "lora"])
def test_dpo_on_two_processes_matches_one_with_the_same_global_batch(tmp_path, tiny_model_dir, adapters):
    """With LoRA the reference is the policy with its adapters off, run through DDP's wrapper; the adapters'
    random A must be the same in one process and in two (it once depended on the random numbers drawn before)."""
    args = ["-m", "posttrain", "dpo", "--model", str(tiny_model_dir), "--data", dpo_data(tmp_path / "pairs.jsonl"),
            "steps=5", "batch_size=8", "log_every=1", "lr=1e-3", "warmup_steps=1", "eval_every=0", "beta=0.5", adapters]
    single, multi = run_single_and_torchrun(tmp_path, args)
    assert losses(multi) == pytest.approx(losses(single), rel=1e-4)
    assert grad_norms(multi) == pytest.approx(grad_norms(single), rel=1e-4)
    assert losses(single)[-1] < losses(single)[0]


def test_lora_on_two_processes_matches_one_and_saves_the_same_adapter(tmp_path, tiny_model_dir):
    args = ["-m", "posttrain", "lora", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"),
            "steps=6", "batch_size=8", "log_every=1", "lr=3e-3", "warmup_steps=1", "ranks=[]", "full_ft=false"]
    single, multi = run_single_and_torchrun(tmp_path, args)
    assert losses(multi) == pytest.approx(losses(single), rel=1e-4)
    assert losses(single)[-1] < losses(single)[0]
    one, two = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (single, multi))
    assert one.keys() == two.keys() and len(one) > 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def test_reward_model_on_two_processes_matches_one(tmp_path, tiny_model_dir):
    """An outcome reward model on the pairs: its backbone and scalar head wrapped together, the loss a mean
    over the pairs. (Two pairs a rank: the loss does not fall in 5 steps, it follows the single process.)"""
    args = ["-m", "posttrain", "reward", "--model", str(tiny_model_dir), "--data", dpo_data(tmp_path / "pairs.jsonl"),
            "steps=5", "batch_size=8", "log_every=1", "lr=1e-3", "warmup_steps=1"]
    single, multi = run_single_and_torchrun(tmp_path, args)
    one, two = (run / "training" / "orm" for run in (single, multi))
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert grad_norms(two) == pytest.approx(grad_norms(one), rel=1e-4)


def test_each_rank_samples_its_own_share_of_the_prompts():
    class Rank:
        def __init__(self, index, world):
            self.process_index, self.num_processes = index, world

    prompts = list(range(8))
    shares = [rank_share(prompts, Rank(r, 2)) for r in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert rank_share(prompts, Rank(0, 1)) == prompts
    with pytest.raises(Exception, match="divisible"):
        rank_share(prompts, Rank(0, 3))


@pytest.mark.parametrize("method, samples", [("grpo", "num_generations=4"), ("ppo", "samples_per_prompt=4"),
                                             ("grpo", "num_generations=4 lora_r=4")])
def test_rl_runs_on_two_processes_with_sharded_rollouts(tmp_path, tiny_model_dir, method, samples):
    """Each rank samples and updates on its own rollouts (packed, with PPO's value head beside the policy; with
    LoRA, the reference is the policy with its adapters off, through DDP's wrapper)."""
    args = ["-m", "posttrain", method, "--model", str(tiny_model_dir), "difficulties=2", "steps=2",
            "prompts_per_step=4", *samples.split(), "batch_size=16", "eval_every=0", "eval_problems=8",
            "kl_problems=4", "--output-dir", str(tmp_path / "multi")]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                               *args], capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]  # one line per step, written once (rank 0)
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["method"] == method
    if "lora_r" in samples:  # only the adapters trained
        assert 0 < summary["params"]["trainable"] < 0.5 * summary["params"]["total"]


def test_rl_updates_on_two_processes_equal_one_on_the_union_of_their_rollouts(tmp_path, tiny_model_dir):
    """Each rank weighs its loss by its share of all ranks' completion tokens or, with GRPO's sequence
    aggregation, completions (PPO also whitens its advantages over all the tokens), so one GRPO or PPO
    update of two ranks, each on one prompt's completions, is the single process's update on both
    prompts', though one prompt's completions are much longer than the other's."""
    script = rl_update_script.__file__
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    rl_update_script.main(str(tiny_model_dir), str(one))
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                               script, str(tiny_model_dir), str(two)], capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-2000:]
    start = load_file(tiny_model_dir / "model.safetensors")
    for method in rl_update_script.UPDATES:
        after_one, after_two = load_file(one / f"{method}.safetensors"), load_file(two / f"{method}.safetensors")
        for name, after in after_one.items():
            before = start.get(name, torch.zeros_like(after))  # PPO's value head starts at 0
            step_one, step_two = after - before, after_two[name] - before  # minus the gradient (SGD, lr 1)
            assert step_one.abs().max() > 1e-4, (method, name)
            torch.testing.assert_close(step_two, step_one, rtol=1e-4, atol=1e-6, msg=f"{method} {name}")


def test_distill_students_on_two_processes_match_one(tmp_path, tiny_model_dir, tokenizer):
    """Every student, the soft-target ones with the teacher's forward on each rank's rows, and the on-policy one
    sampling the whole global batch on every rank (same weights, same seed: the same rows) before its share."""
    teacher = tmp_path / "teacher"
    random_model(tokenizer, seed=1, hidden=64).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    args = ["-m", "posttrain", "distill", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"),
            f"teacher={teacher}", "steps=4", "batch_size=8", "log_every=1", "lr=3e-3", "warmup_steps=1",
            "sample_every=2"]
    single, multi = run_single_and_torchrun(tmp_path, args)
    for kind in ("sft", "seq_kd", "soft_kd", "on_policy"):
        one, two = (run / kind / "seed0" for run in (single, multi))
        assert losses(two) == pytest.approx(losses(one), rel=1e-4), kind
        assert grad_norms(two) == pytest.approx(grad_norms(one), rel=1e-4), kind
    assert losses(single / "soft_kd" / "seed0")[-1] < losses(single / "soft_kd" / "seed0")[0]


JOIN_GROUP_THEN_RUN = """
import sys
import torch.distributed as dist
from posttrain import cli
dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
code = cli.main(sys.argv[2:])
print("exit", code, "group open", dist.is_initialized())
"""


def test_a_run_closes_its_process_group_before_the_process_exits(tmp_path, tiny_model_dir):
    """A gloo group left open until the interpreter exits aborted a rank there in 4 of 40 two-process runs, so
    torchrun failed runs that had finished; the command closes the group it ran in on its way out."""
    args = ["sft", "--model", str(tiny_model_dir), "--data", sft_data(tmp_path / "train.jsonl"), "steps=1",
            "batch_size=4", "--output-dir", str(tmp_path / "run")]
    ran = subprocess.run([sys.executable, "-c", JOIN_GROUP_THEN_RUN, f"file://{tmp_path / 'rendezvous'}", *args],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "exit 0 group open False" in ran.stdout
