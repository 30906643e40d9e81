"""GRPO's loss against hand-derived values and against TRL's GRPOTrainer."""
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from posttrain import lora
from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.losses.grpo import AGGREGATIONS, grpo_loss, sequence_mean, token_mean
from posttrain.methods.common import policy_path
from posttrain.methods.rl import grpo
from posttrain.models import load_model
from posttrain.reward_models import new_reward_model
from posttrain.rl.advantages import group_advantages
from posttrain.rollouts import cot_prompts, forward_logprobs, sample_rollouts, training_problems
from posttrain.training import make_accelerator
from tests import rl_update_script

HALF, QUARTER = math.log(0.5), math.log(0.25)


def test_grpo_loss_by_hand():
    """Two completions of 2 and 1 tokens, advantages +1 and -1, on-policy (ratio 1), so each token's
    surrogate is -A: (-1, -1) and (+1). pi(token) = 0.5 and ref(token) = 0.25 everywhere, so each
    token's k3 = log 2 - 0.5 = 0.193147; beta = 0.1 adds 0.0193147 per token.
        token-level:    (-1 - 1 + 1) / 3 + 0.0193147 = -0.313952
        sequence-level: (-1 + 1) / 2     + 0.0193147 =  0.0193147
    """
    logp = torch.full((2, 2), HALF)
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([1.0, -1.0])
    k3 = math.log(2) - 0.5
    for aggregate, want in [(token_mean, -1 / 3 + 0.1 * k3), (sequence_mean, 0.1 * k3)]:
        loss, metrics = grpo_loss(logp, logp, torch.full((2, 2), QUARTER), advantages, mask, beta=0.1, aggregate=aggregate)
        assert loss.item() == pytest.approx(want, abs=1e-6)
        assert metrics["kl"] == pytest.approx(k3, abs=1e-6)
    assert set(AGGREGATIONS) == {"token", "sequence"}


def test_beta_zero_needs_no_reference_and_clip_ratios_are_counted():
    """Completion 1 (A = +1): ratio 1.5 on its first token -> clipped from above.
    Completion 2 (A = -1): ratio 0.5 -> clipped from below. 2 of 3 tokens are clipped."""
    logp = torch.zeros(2, 2)
    old_logp = torch.tensor([[-math.log(1.5), 0.0], [-math.log(0.5), 0.0]])
    loss, metrics = grpo_loss(logp, old_logp, None, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
    # surrogate: -min(1.5, 1.2) = -1.2; -1 (ratio 1); -min(-0.5, -0.8) = 0.8  -> token mean (-1.2 - 1 + 0.8) / 3
    assert loss.item() == pytest.approx(-1.4 / 3, abs=1e-6)
    assert "kl" not in metrics
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 3)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 3)


def trl_grpo_loss(loss_type, beta, eps, logp, old_logp, ref_logp, advantages, mask):
    """TRL keeps GRPO's loss inline in GRPOTrainer._compute_loss; run it on a stand-in trainer whose
    log-prob function returns ours."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    rows, width = logp.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        model=SimpleNamespace(training=True), beta=beta, epsilon_low=eps, epsilon_high=eps, loss_type=loss_type,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False, aux_loss_enabled=False,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x),
    )
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask.float(),
              "advantages": advantages, "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp}
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("aggregate, loss_type", [("token", "bnpo"), ("sequence", "grpo")])
def test_parity_with_trl_grpo_trainer(aggregate, loss_type):
    g = torch.Generator().manual_seed(0)
    n, width = 8, 6
    mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (n, 1), generator=g)).float()
    logp = -torch.rand(n, width, generator=g) * 2
    old_logp = logp + 0.4 * torch.randn(n, width, generator=g)  # some ratios leave the clip range
    ref_logp = logp + 0.3 * torch.randn(n, width, generator=g)
    advantages = torch.randn(n, generator=g)
    want = trl_grpo_loss(loss_type, 0.04, 0.2, logp, old_logp, ref_logp, advantages, mask)
    got, _ = grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04, aggregate=AGGREGATIONS[aggregate])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


# ---- the method on the quick policy --------------------------------------------------------------------------

TINY = ["model=sft-policy-quick", "difficulties=2", "steps=2", "prompts_per_step=4", "num_generations=4",
        "batch_size=8", "eval_every=1", "eval_problems=20", "kl_problems=8", "temperature=0.7"]


def test_a_grpo_step_moves_probability_toward_the_better_completions():
    """One update on a rollout batch of the quick policy raises the summed log-prob of the completions
    with a positive advantage and lowers those with a negative one."""
    model, tokenizer = load_model(policy_path("sft-policy-quick"))
    prompts, answers = cot_prompts(training_problems([2], 8, seed=0))
    rollouts = sample_rollouts(model, tokenizer, prompts, answers, num_samples=8, max_new_tokens=60, temperature=1.0, seed=0)
    advantages = group_advantages(rollouts.rewards, 8)
    assert (advantages > 0).any() and (advantages < 0).any()

    def completion_logps():
        with torch.no_grad():
            return (forward_logprobs(model, rollouts.batch)[0] * rollouts.mask).sum(-1)

    before = completion_logps()
    logp = forward_logprobs(model, rollouts.batch)[0]
    loss, _ = grpo_loss(logp, logp.detach(), None, advantages, rollouts.mask)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.03).step()  # a small step: the first-order effect shows
    change = completion_logps() - before
    assert change[advantages > 0].mean() > 0 > change[advantages < 0].mean()


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_accumulated_micro_batches_give_the_minibatchs_update(tiny_model_dir, aggregation):
    """grad_accum splits a minibatch into micro-batches (fewer activations alive at once) with unequal token
    counts; weighted by their share of the minibatch, their summed gradients are the whole minibatch's."""
    accelerator = make_accelerator("fp32")
    start = load_file(tiny_model_dir / "model.safetensors")
    steps, forwards = {}, {}
    for grad_accum in (1, 4):
        model, tokenizer = load_model(str(tiny_model_dir))
        calls = []
        model.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        after = rl_update_script.grpo_update(model, tokenizer, accelerator, str(tiny_model_dir), aggregation, grad_accum)
        steps[grad_accum] = {name: after[name] - start[name] for name in start}  # minus the gradient (SGD, lr 1)
        forwards[grad_accum] = sum(calls)  # the passes that keep activations for a backward
    assert forwards == {1: 1, 4: 4}
    assert max(step.abs().max() for step in steps[1].values()) > 1e-4
    for name, step in steps[1].items():
        torch.testing.assert_close(steps[4][name], step, rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_run_output_contract(tmp_path):
    summary = grpo.run(load_config(grpo.GRPOConfig, None, TINY + [f"output_dir={tmp_path}"]))
    assert summary["method"] == "grpo" and summary["metrics"]["completions_sampled"] == 2 * 4 * 4
    assert summary["metrics"]["kl"] >= 0 and "accuracy" in summary["baseline"]
    assert [p["step"] for p in summary["metrics"]["frontier"]] == [0, 1, 2]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                 "completions/mean_length"):
        assert name in lines[0]
    assert "eval/accuracy" in lines[0]
    for name in ("training_curve.png", "reward_kl_frontier.png", "samples.jsonl", "model/config.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_compiled_grpo_run_samples_and_updates_as_the_eager_one(tmp_path):
    """compile=true (compiled decode step over a static cache, compiled update forward; about a minute of
    compiling on a CPU) samples the same completions and takes the same steps."""
    def history(name, *extra):
        grpo.run(load_config(grpo.GRPOConfig, None, TINY + ["eval_every=0", f"output_dir={tmp_path / name}", *extra]))
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    eager, compiled = history("eager"), history("compiled", "compile=true")
    for a, b in zip(eager, compiled):
        assert b["reward"] == a["reward"] and b["completions/mean_length"] == a["completions/mean_length"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)


def test_beta_zero_keeps_no_reference_and_dr_grpo_runs(tmp_path):
    summary = grpo.run(load_config(grpo.GRPOConfig, None, TINY + ["beta=0", "scale_rewards=false", "eval_every=0",
                                                                   f"output_dir={tmp_path}"]))
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert "kl" not in line  # no KL term without a reference
    assert summary["metrics"]["kl"] >= 0  # the held-out KL is still measured (the reference is loaded for it)


def test_process_rewards_from_a_reward_model_folder(tmp_path):
    """reward=prm scores completions with a reward model folder (an untrained one here: the wiring only)."""
    new_reward_model(policy_path("sft-policy-quick"), "prm").save(tmp_path / "prm")
    cfg = load_config(grpo.GRPOConfig, None, TINY + ["steps=1", "eval_every=0", "reward=prm",
                                                     f"reward_model={tmp_path / 'prm'}", f"output_dir={tmp_path / 'run'}"])
    grpo.run(cfg)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert 0 < line["reward"] < 1 and line["reward"] not in (0.25, 0.5, 0.75)  # PRM probabilities, not 1/0 verdicts


def test_reward_choices_are_checked(tmp_path):
    with pytest.raises(UserError, match="verifier or prm"):
        load_config(grpo.GRPOConfig, None, ["reward=orm"])
    cfg = load_config(grpo.GRPOConfig, None, ["reward=prm", f"model={tmp_path}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="reward_model=FOLDER"):
        grpo.run(cfg)


@pytest.mark.slow
def test_default_grpo_gains_fifteen_points_over_the_shared_policy(tmp_path):
    """From the shared policy, GRPO with the verifier's reward gains >= 15 points of held-out accuracy."""
    summary = grpo.run(load_config(grpo.GRPOConfig, None, [f"output_dir={tmp_path}"]))
    assert summary["metrics"]["accuracy"] >= summary["baseline"]["accuracy"] + 0.15
    assert 0 < summary["metrics"]["kl"] < 5


def prompt_records(path, shift: int = 0, n: int = 80) -> str:
    """World 2-digit problems as a user's prompt/answer JSONL, their answers off by `shift`."""
    prompts, answers = cot_prompts(training_problems([2], n, seed=5))
    path.write_text("".join(json.dumps({"prompt": q, "answer": int(a) + shift}) + "\n" for q, a in zip(prompts, answers)))
    return str(path)


@pytest.mark.parametrize("shift", [0, 1000])
def test_grpo_trains_and_measures_on_a_users_prompts(tmp_path, shift):
    """--data prompts: the rollouts and the held-out tenth are the records', scored against the records'
    answers (the quick policy's greedy answers are right on most 2-digit additions, its samples at
    temperature 0.7 on some; with every answer 1,000 too large, never)."""
    data = prompt_records(tmp_path / "prompts.jsonl", shift)
    summary = grpo.run(load_config(grpo.GRPOConfig, None, TINY + [f"data={data}", f"output_dir={tmp_path / 'run'}"]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [line["reward"] for line in lines]
    assert summary["baseline"]["n"] == 8 and summary["metrics"]["n"] == 8  # a tenth of 80 held out
    if shift:
        assert rewards == [0.0, 0.0] and summary["baseline"]["accuracy"] == summary["metrics"]["accuracy"] == 0.0
    else:
        assert min(rewards) > 0 and summary["baseline"]["accuracy"] >= 0.5
    held = {json.loads(line)["prompt"] for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()}
    given = {json.loads(line)["prompt"] for line in (tmp_path / "prompts.jsonl").read_text().splitlines()}
    assert len(held) == 8 and held <= given


def test_bad_prompt_records_fail_before_training(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Q: 1+1", "answer": 2}\n{"prompt": "Q: 2+2"}\n')
    with pytest.raises(UserError, match=r"prompts.jsonl:2: missing field 'answer'"):
        grpo.run(load_config(grpo.GRPOConfig, None, [f"data={data}", f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_grpo_with_lora_trains_adapters_against_the_adapters_off(tmp_path):
    """lora_r: only the adapters train (a few percent of the parameters), the KL term's reference is the
    policy with its adapters off (> 0 once the adapters moved; it would stay 0 were they never switched
    off), and the adapter is saved in PEFT's format beside the merged model."""
    cfg = load_config(grpo.GRPOConfig, None, TINY + ["lora_r=4", "lr=1e-3", "eval_every=0",
                                                     f"output_dir={tmp_path}"])
    summary = grpo.run(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["kl"] > 0
    params = summary["params"]
    assert 0 < params["trainable"] < 0.1 * params["total"]
    base, _ = load_model(policy_path("sft-policy-quick"))
    adapted = lora.load_adapter(base, tmp_path / "adapter")
    merged, _ = load_model(str(tmp_path / "model"))
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)
