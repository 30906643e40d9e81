"""Critic-free advantage estimators (RLOO, REINFORCE++) and GRPO's successors (clip-higher, GSPO, Dr. GRPO,
CISPO, overlong shaping) against hand-derived numbers, TRL's GRPOTrainer, and one quick run."""
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.losses.grpo import (LOSS_TYPES, constant_mean, grpo_loss, importance_ratio, sequence_mean,
                                   token_mean)
from posttrain.losses.ppo import clipped_surrogate_tokens
from posttrain.methods.rl import grpo
from posttrain.models import load_model
from posttrain.rl.advantages import (ADVANTAGE_ESTIMATORS, masked_mean, overlong_penalty, reinforce_pp_advantages,
                                     rloo_advantages)
from posttrain.training import make_accelerator, prepare_for_losses
from tests import rl_update_script

# ---- advantage estimators --------------------------------------------------------------------------------------


def test_rloo_baseline_is_the_mean_of_the_other_completions():
    """G = 2, rewards (1, 0 | 0, 1): each baseline is the other reward, so A = (1, -1, -1, 1).
    G = 4, rewards (1, 0, 0, 0): baselines (0, 1/3, 1/3, 1/3), so A = (1, -1/3, -1/3, -1/3)."""
    assert torch.equal(rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    four = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert torch.allclose(four, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_reinforce_pp_whitens_over_the_batch_with_and_without_the_group_baseline():
    """Rewards (1, 0, 0, 0 | 1, 1, 1, 1), N = 8.
    REINFORCE++: batch mean 5/8, population std sqrt(5/8 * 3/8) = 0.484123, so a 1 gets
        (3/8) / 0.484123 = 0.774597 and a 0 gets -(5/8) / 0.484123 = -1.290994, whatever its group.
    REINFORCE++-baseline: group-centred (0.75, -0.25, -0.25, -0.25 | 0, 0, 0, 0) has mean 0 and population
        std sqrt((0.5625 + 3 * 0.0625) / 8) = 0.306186, so (2.449490, -0.816497 x 3, 0 x 4)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    plain = reinforce_pp_advantages(rewards, 4)
    assert torch.allclose(plain, torch.where(rewards > 0, 0.774597, -1.290994), atol=1e-5)
    baseline = ADVANTAGE_ESTIMATORS["reinforce++_baseline"](rewards, 4)
    assert torch.allclose(baseline, torch.tensor([2.449490, -0.816497, -0.816497, -0.816497, 0, 0, 0, 0]), atol=1e-5)
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "reinforce++", "reinforce++_baseline"}


def test_overlong_penalty_ramps_over_the_buffer():
    """L_max 10, L_cache 4: no penalty up to 6 tokens, then (6 - |y|) / 4 down to -1 at 10, and -1 beyond."""
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    assert torch.allclose(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))


def test_the_run_shapes_rewards_then_applies_the_chosen_estimator():
    """Group (1, 1 | 0, 1), lengths (5, 8 | 5, 5), budget 10, buffer 4: the 8-token answer loses 0.5, so
    rewards (1, 0.5 | 0, 1) and RLOO gives (0.5, -0.5 | -1, 1)."""
    rollouts = SimpleNamespace(rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]), lengths=torch.tensor([5.0, 8.0, 5.0, 5.0]))
    cfg = grpo.GRPOConfig(num_generations=2, advantage_estimator="rloo", overlong_buffer=4)
    assert torch.allclose(grpo.rollout_advantages(rollouts, cfg, 10), torch.tensor([0.5, -0.5, -1.0, 1.0]))
    unshaped = grpo.GRPOConfig(num_generations=2, advantage_estimator="rloo")
    assert torch.allclose(grpo.rollout_advantages(rollouts, unshaped, 10), torch.tensor([0.0, 0.0, -1.0, 1.0]))


# ---- the losses ------------------------------------------------------------------------------------------------


def random_batch(seed: int = 0, n: int = 8, width: int = 6):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (n, 1), generator=g)).float()
    logp = -torch.rand(n, width, generator=g) * 2
    old_logp = logp + 0.4 * torch.randn(n, width, generator=g)  # some ratios leave the clip range
    ref_logp = logp + 0.3 * torch.randn(n, width, generator=g)
    return logp, old_logp, ref_logp, torch.randn(n, generator=g), mask


def test_the_default_loss_is_the_symmetric_clipped_surrogate_bit_for_bit():
    logp, old_logp, _, advantages, mask = random_batch()
    logp.requires_grad_(True)
    loss, _ = grpo_loss(logp, old_logp, None, advantages, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    want = masked_mean(clipped_surrogate_tokens(logp, old_logp, advantages[:, None], 0.2)[0], mask)
    (want_grad,) = torch.autograd.grad(want, logp)
    assert torch.equal(loss, want) and torch.equal(grad, want_grad)


def test_clip_higher_clips_only_above_one_plus_epsilon_high():
    """eps_low 0.2, eps_high 0.28, one token per completion:
        A = +1, ratio 1.25: inside [0.8, 1.28], so -1.25 (the symmetric clip would give -1.2)
        A = +1, ratio 1.40: clipped to 1.28, so -1.28
        A = -1, ratio 0.70: clipped from below at 0.8 as before, so +0.8"""
    ratios = torch.tensor([[1.25], [1.40], [0.70]])
    logp, mask, advantages = torch.zeros(3, 1), torch.ones(3, 1), torch.tensor([1.0, 1.0, -1.0])
    per_completion = []
    for i in range(3):
        loss, _ = grpo_loss(logp[i:i + 1], -ratios[i:i + 1].log(), None, advantages[i:i + 1], mask[i:i + 1],
                            clip_eps_high=0.28)
        per_completion.append(loss.item())
    assert per_completion == pytest.approx([-1.25, -1.28, 0.8], abs=1e-6)
    _, metrics = grpo_loss(logp, -ratios.log(), None, advantages, mask, clip_eps_high=0.28)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 3)  # only the 1.40
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 3)
    symmetric, _ = grpo_loss(logp[:1], -ratios[:1].log(), None, advantages[:1], mask[:1])
    assert symmetric.item() == pytest.approx(-1.2, abs=1e-6)


def test_gspo_ratio_is_the_geometric_mean_with_the_gradient_of_the_sequence_objective():
    """s_i = exp(mean_t log ratio_it) on every token; the loss with sequence aggregation has the gradient
    of GSPO's own objective -1/G sum_i min(s_i A_i, clip(s_i) A_i), where s_i is differentiated whole."""
    logp, old_logp, _, advantages, mask = random_batch(seed=1)
    ratio = importance_ratio(logp, old_logp, mask, "sequence")
    s = torch.exp(((logp - old_logp) * mask).sum(-1) / mask.sum(-1))  # (N,)
    assert torch.allclose(ratio, s[:, None].expand_as(ratio))

    logp.requires_grad_(True)
    loss, _ = grpo_loss(logp, old_logp, None, advantages, mask, importance_sampling="sequence", aggregate=sequence_mean)
    (grad,) = torch.autograd.grad(loss, logp)
    s = torch.exp(((logp - old_logp) * mask).sum(-1) / mask.sum(-1))
    gspo = -torch.minimum(s * advantages, s.clamp(0.8, 1.2) * advantages).mean()
    (want,) = torch.autograd.grad(gspo, logp)
    assert loss.item() == pytest.approx(gspo.item(), rel=1e-6)
    assert torch.allclose(grad * mask, want * mask, atol=1e-7)


def test_dr_grpo_divides_by_the_completions_times_the_budget():
    """On-policy, advantages +1 and -1 on completions of 2 and 1 tokens: token terms (-1, -1 | +1), sum -1;
    N = 2 completions, L_max = 4, so -1 / 8, whatever the lengths."""
    logp, mask = torch.zeros(2, 2), torch.tensor([[1, 1], [1, 0]])
    loss, _ = grpo_loss(logp, logp, None, torch.tensor([1.0, -1.0]), mask,
                        aggregate=lambda x, m: constant_mean(x, m, max_length=4))
    assert loss.item() == pytest.approx(-0.125)


def test_cispo_keeps_the_gradient_of_clipped_tokens_through_log_pi_only():
    """One completion of 2 tokens, A = 2, log pi = (-0.5, -1.0), ratios (1.5, 0.5), eps_high 0.28:
    weights sg(min(r, 1.28)) = (1.28, 0.5), no lower bound.
        loss = -(1.28 * 2 * -0.5 + 0.5 * 2 * -1.0) / 2 = 1.14
        d loss / d log pi = -(1.28, 0.5) * 2 / 2 = (-1.28, -0.5), nothing through the ratio's pi;
    the clipped surrogate gives the 1.5 token no gradient at all."""
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    old_logp = logp.detach() - torch.tensor([[math.log(1.5), math.log(0.5)]])
    advantages, mask = torch.tensor([2.0]), torch.ones(1, 2)
    loss, metrics = grpo_loss(logp, old_logp, None, advantages, mask, clip_eps_high=0.28, surrogate="cispo")
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(1.14, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-1.28, -0.5]]), atol=1e-6)
    assert metrics["clip_ratio/high_mean"] == 0.5 and metrics["clip_ratio/low_mean"] == 0.0
    clipped, _ = grpo_loss(logp, old_logp, None, advantages, mask, clip_eps_high=0.28)
    (clipped_grad,) = torch.autograd.grad(clipped, logp)
    assert clipped_grad[0, 0] == 0 and clipped_grad[0, 1] != 0


def trl_loss(loss_type, logp, old_logp, ref_logp, advantages, mask, *, eps_high, level="token", max_length=None):
    """TRL's GRPOTrainer._compute_loss on a stand-in trainer whose log-prob function returns ours (as in
    test_grpo.py), with its epsilon_high, importance_sampling_level and max_completion_length."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    rows, width = logp.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        model=SimpleNamespace(training=True), beta=0.04, epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        max_completion_length=max_length, use_vllm=False, aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1),
    )
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp,
              "num_items_in_batch": mask.sum()}
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence"), ("dapo", "sequence"),
                                              ("dr_grpo", "token"), ("cispo", "token")])
def test_parity_with_trl(loss_type, level):
    """Loss and gradient equal TRL's for each loss_type; for cispo, TRL's epsilon_high is our 1 + epsilon_high."""
    logp, old_logp, ref_logp, advantages, mask = random_batch(seed=2)
    surrogate, aggregation = LOSS_TYPES[loss_type]
    aggregate = {"token": token_mean, "sequence": sequence_mean,
                 "constant": lambda x, m: constant_mean(x, m, max_length=9)}[aggregation]
    ours_logp, trl_logp = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    got, _ = grpo_loss(ours_logp, old_logp, ref_logp, advantages, mask, clip_eps_high=0.28, beta=0.04,
                       aggregate=aggregate, importance_sampling=level, surrogate=surrogate)
    want = trl_loss(loss_type, trl_logp, old_logp, ref_logp, advantages, mask,
                    eps_high=1.28 if loss_type == "cispo" else 0.28, level=level, max_length=9)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    want.backward()
    assert torch.allclose(ours_logp.grad * mask, trl_logp.grad * mask, atol=1e-6)


# ---- the method ------------------------------------------------------------------------------------------------


def test_loss_type_names_the_surrogate_and_aggregation():
    assert grpo.GRPOConfig().surrogate_and_aggregation() == ("clip", "token")
    assert grpo.GRPOConfig(loss_aggregation="sequence").surrogate_and_aggregation() == ("clip", "sequence")
    assert {name: grpo.GRPOConfig(loss_type=name).surrogate_and_aggregation() for name in LOSS_TYPES} == {
        "grpo": ("clip", "sequence"), "dapo": ("clip", "token"), "dr_grpo": ("clip", "constant"),
        "cispo": ("cispo", "token")}


@pytest.mark.parametrize("overrides, message", [
    (["advantage_estimator=ppo"], "advantage_estimator must be one of grpo, rloo"),
    (["loss_type=bnpo"], "loss_type must be one of grpo, dapo, dr_grpo, cispo"),
    (["importance_sampling_level=seq"], "importance_sampling_level must be one of token, sequence"),
    (["loss_type=grpo", "loss_aggregation=token"], "set loss_type or loss_aggregation, not both"),
    (["advantage_estimator=rloo", "scale_rewards=false"], "scale_rewards=false applies to advantage_estimator=grpo"),
    (["epsilon_high=0"], "epsilon_high must be > 0"),
    (["overlong_buffer=-1"], "overlong_buffer >= 0"),
])
def test_bad_choices_are_refused_with_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(grpo.GRPOConfig, None, overrides)


@pytest.mark.parametrize("options", [["loss_type=dr_grpo"], ["loss_type=cispo", "epsilon_high=0.28"],
                                     ["loss_type=grpo", "importance_sampling_level=sequence"]])
def test_accumulated_micro_batches_give_the_minibatchs_update(tiny_model_dir, options):
    """With grad_accum 4 (micro-batches of unequal token counts) each loss type's update equals the whole
    minibatch's: the micro-batch weights count the units its normaliser counts."""
    start = load_file(tiny_model_dir / "model.safetensors")
    steps = {}
    for grad_accum in (1, 4):
        model, tokenizer = load_model(str(tiny_model_dir))
        cfg = load_config(grpo.GRPOConfig, None, ["num_generations=4", "batch_size=8", "beta=0", "max_grad_norm=0",
                                                  "epochs=2", f"grad_accum={grad_accum}", *options])
        prepare_for_losses(model, cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        rollouts = rl_update_script.rollouts_of(rl_update_script.GROUPS, tokenizer)
        grpo.optimise(model, None, optimizer, rl_update_script.constant(optimizer), make_accelerator("fp32"),
                      rollouts, cfg, completion_budget=40)
        steps[grad_accum] = {name: model.state_dict()[name] - start[name] for name in start}
    assert max(step.abs().max() for step in steps[1].values()) > 1e-4
    for name, step in steps[1].items():
        torch.testing.assert_close(steps[4][name], step, rtol=1e-4, atol=1e-6, msg=name)


def test_quick_grpo_run_with_rloo_and_dapo_clip_higher(tmp_path):
    """The run end to end on the quick policy with advantage_estimator=rloo, loss_type=dapo, clip-higher,
    sequence-level ratios and the overlong penalty: it trains and writes its metrics."""
    overrides = ["model=sft-policy-quick", "difficulties=2", "steps=2", "prompts_per_step=4", "num_generations=4",
                 "batch_size=8", "epochs=2", "eval_every=0", "eval_problems=20", "kl_problems=8", "temperature=0.7",
                 "beta=0", "advantage_estimator=rloo", "loss_type=dapo", "epsilon_high=0.28",
                 "importance_sampling_level=sequence", "overlong_buffer=8", f"output_dir={tmp_path}"]
    summary = grpo.run(load_config(grpo.GRPOConfig, None, overrides))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(math.isfinite(r["loss"]) for r in lines)
    assert summary["config"]["advantage_estimator"] == "rloo" and summary["config"]["loss_type"] == "dapo"
