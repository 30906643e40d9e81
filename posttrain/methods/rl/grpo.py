"""Group Relative Policy Optimisation (GRPO, Shao et al. 2024, "DeepSeekMath", Sec. 4.1).

No value model: the baseline of a completion is the other completions of the same prompt.

    for each step:
        P training prompts, G completions each (one shared prefill per prompt), rewards from the verifier
        A_i = (r_i - mean(group)) / std(group)          or Dr. GRPO: r_i - mean(group)   (rl/advantages.py)
        old log-probs (and the reference's, when beta > 0), then `epochs` passes of minibatches:
            loss = clipped surrogate with A_i on every token + beta * k3 KL to the reference (losses/grpo.py)

The start is the shared chain-of-thought SFT policy (posttrain.stages.policy: 4-digit addition, right
about two times in three, its errors the sloppy demonstrator's forgotten carry); by default the verifier's 1/0 outcome
reward is the only signal. Groups whose completions all agree (all right or all wrong) carry no
advantage and are logged as `frac_reward_zero_std`. Departures from the paper: the loss is averaged per
token by default (DAPO, `loss_aggregation=token`; `sequence` is the paper's Eq. 3); with beta = 0 no
reference model is kept at all; and `reward=prm` scores each completion with the process reward model's
aggregate of its step probabilities (the minimum, from `posttrain reward`) as one outcome-level reward,
rather than the paper's per-step advantages (Sec. 4.1.3). Every `eval_every` steps the run measures
held-out accuracy and the KL to the SFT reference: its points on the reward-KL frontier
(reward_kl_frontier.png; `posttrain report` draws the methods side by side).

With `lora_r` > 0 the policy trains a LoRA update of `lora_targets` (posttrain/lora.py) and the KL
term's reference is the same model with its adapters switched off (`lora.disabled`): no second copy
of the weights, as TRL does with a PEFT model. The run then also writes `adapter/` (PEFT format).
LoRA needs a higher learning rate than full-weight training (`lora_r=8 lr=1e-3`: 32,768 trainable
parameters of 935,040).

With a chat model and no `--data` (`--model posttrain:smollm2-135m`, the real pretrained LLM), the prompts
are world additions asked in words ("What is 48 plus 80? Reply with just the number.", world/chat.py) and
the reward reads the reply's answer by convention (world/answers.py): GRPO from the instruct model itself, no
SFT first. Its preset (`PRESETS`) departs from the defaults where a 135M-parameter model needs it:
learning rate 1e-5, sampling at temperature 0.7 (at 1.0 the model's samples are rarely right, so most
groups teach nothing), beta = 0 (as TRL's default: no reference in memory; the KL to the start model is
still measured at each evaluation) and 15 rollout batches of 16 x 8.

With `--data`, the prompts are the user's (`{"prompt", "answer"}` records; a seeded tenth held out for
the accuracy, reward and KL measurements, at most `eval_problems` of them measured) and the verifier reads
the completion's answer by common conventions (`\\boxed{}`, `####`, `A:` or "the answer is", else the last
number; world/answers.py). Beside accuracy, `reward` is the mean reward the run trains with (verifier, reward
model or the user's functions) of the held-out greedy completions, before and after.

    posttrain grpo --output-dir runs/grpo
    posttrain grpo scale_rewards=false beta=0          # Dr. GRPO without a reference model
    posttrain grpo --model Qwen/Qwen2.5-0.5B-Instruct --data math.jsonl max_new_tokens=512 precision=bf16
    posttrain grpo lora_r=8 lr=1e-3                    # train a LoRA update; the reference is the adapters off
    posttrain grpo --model posttrain:smollm2-135m      # the real pretrained LLM (its preset applies)

GRPO's successors, under TRL's option names where TRL has one (losses/grpo.py, rl/advantages.py):
`advantage_estimator` grpo | rloo | reinforce++ | reinforce++_baseline (OpenRLHF's name, verl's
`adv_estimator`); `loss_type` grpo | dapo | dr_grpo | cispo; `epsilon_high` (DAPO's clip-higher);
`importance_sampling_level=sequence` (GSPO); `overlong_buffer` (DAPO's soft overlong penalty);
`dynamic_sampling` (DAPO's: groups whose rewards all agree are dropped and refilled from fresh prompts, at most
`max_refills` more rollout batches per step; rollouts.step_rollouts). Every run counts the completions it sampled
(`samples_drawn`, also at each frontier point) so that runs compare at equal samples; `equal_samples=true`
stops a run with dynamic sampling once it has drawn what `steps` batches draw without refills. `posttrain rloo`,
`reinforce-pp`, `dapo` and `gspo` are this run under their papers' settings (methods/rl/rloo.py ...).

    posttrain grpo advantage_estimator=rloo loss_type=dapo epsilon_high=0.28
    posttrain grpo loss_type=grpo importance_sampling_level=sequence clip_eps=0.0003 epsilon_high=0.0004   # GSPO
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import ClassVar

import torch

from posttrain import lora, sharding
from posttrain.chat_world import GeneralProbe, general_nll, uses_chat_world
from posttrain.config import check_choice
from posttrain.data import has_chat_template
from posttrain.errors import UserError
from posttrain.lora import AdapterConfig
from posttrain.losses.grpo import AGGREGATIONS, LOSS_TYPES, constant_mean, grpo_loss
from posttrain.methods.common import (headline, policy_path, prepare_output, remove_checkpoints, reward_model_path,
                                      save_policy, write_samples, write_summary)
from posttrain.models import load_model
from posttrain.onpolicy import OnPolicy, train_on_policy
from posttrain.records import read_prompts
from posttrain.rewards import check_reward_choice, held_out_reward, user_reward_answers
from posttrain.report.plots import training_curve
from posttrain.report.rl_plots import draw_frontier
from posttrain.rl.advantages import ADVANTAGE_ESTIMATORS, group_advantages, masked_mean, overlong_penalty
from posttrain.world.answers import answer_rewards
from posttrain.heldout import run_prompts
from posttrain.rollouts import forward_logprobs, reference_logprobs, reward_function
from posttrain.training import (TrainingConfig, TrainResult, compiled_forward, forward_as, lr_lambda,
                                make_accelerator, make_optimizer, prepare_for_losses, prepare_trained, shard_frozen,
                                shard_for_training, share_of_all_processes)


@dataclasses.dataclass
class GRPOConfig(AdapterConfig, TrainingConfig):
    METHOD: ClassVar[str] = "grpo"  # the name the run writes (summary, plots): each named variant's own
    model: str = "sft-policy"  # starting policy: sft-policy (shared CoT SFT model), a model folder or hub id
    data: str | None = None  # JSONL of prompt/answer records (a tenth held out); default: world addition problems
    output_dir: str = "runs/grpo"  # where summary.json, metrics.jsonl, plots and the model go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    max_new_tokens: int | None = None  # completion budget (default: the longest world solution + 8; 256 with data)
    reward: str = "verifier"  # verifier (1/0) | prm (process reward model) | yours: a.py:func,pkg.module:func
    reward_weights: list[float] = dataclasses.field(default_factory=list)  # per function of yours (default: 1 each)
    prompt_field: str = "prompt"  # the --data field holding the prompt (GSM8K: question)
    answer_field: str = "answer"  # the --data field holding the reference answer
    reward_model: str | None = None  # PRM folder for reward=prm (default: the cached `posttrain reward` one)
    prompts_per_step: int = 16  # training prompts per rollout batch
    num_generations: int = 8  # G: completions per prompt
    temperature: float = 1.0  # sampling temperature of the rollouts
    epochs: int = 1  # passes over each rollout batch (mu in the paper)
    beta: float = 0.1  # weight of the k3 KL to the reference (0: no reference model kept)
    clip_eps: float = 0.2  # clip range of the probability ratio
    advantage_estimator: str = "grpo"  # grpo (group-normalised) | rloo | reinforce++ | reinforce++_baseline
    scale_rewards: bool = True  # divide by the group's std (false: Dr. GRPO); advantage_estimator=grpo only
    loss_type: str | None = None  # TRL's: grpo | dapo | dr_grpo | cispo (default: the clipped loss by loss_aggregation)
    loss_aggregation: str | None = None  # token (every token weighs the same; the default) | sequence (paper's Eq. 3)
    epsilon_high: float | None = None  # upper clip of the ratio: 1 + this (DAPO: 0.28; default clip_eps), cispo's too
    importance_sampling_level: str = "token"  # token | sequence (GSPO: one ratio per completion)
    overlong_buffer: int = 0  # DAPO's soft penalty over the completion budget's last this many tokens (0: off)
    dynamic_sampling: bool = False  # DAPO's: drop groups whose rewards all agree, sample more prompts in their place
    max_refills: int = 3  # dynamic sampling: at most this many more rollout batches per step
    equal_samples: bool = False  # stop once refills included the run drew steps x prompts_per_step x num_generations
    eval_every: int = 15  # steps between held-out accuracy/KL measurements (0: start and end only)
    eval_problems: int = 300  # held-out test problems for accuracy
    kl_problems: int = 100  # held-out prompts whose samples measure KL to the reference
    steps: int = 45  # rollout batches
    batch_size: int = 32  # completions per optimizer step: 4 steps per rollout batch of 16 x 8
    lr: float = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 1.0  # constant learning rate after warmup
    log_every: int = 1

    def validate(self) -> None:
        super().validate()
        check_reward_choice(self.reward, self.reward_weights, ("verifier", "prm"))
        if self.num_generations < 2:
            raise UserError("num_generations must be >= 2: the group is the baseline")
        check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice("loss_type", self.loss_type, LOSS_TYPES, optional=True)
        check_choice("loss_aggregation", self.loss_aggregation, AGGREGATIONS, optional=True)
        check_choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        if self.loss_type and self.loss_aggregation:
            raise UserError(f"set loss_type or loss_aggregation, not both: loss_type={self.loss_type} "
                            f"aggregates by {LOSS_TYPES[self.loss_type][1]}")
        if not self.scale_rewards and self.advantage_estimator != "grpo":
            raise UserError(f"scale_rewards=false applies to advantage_estimator=grpo only (Dr. GRPO), "
                            f"got advantage_estimator={self.advantage_estimator}; drop scale_rewards")
        if (self.epsilon_high is not None and self.epsilon_high <= 0) or self.overlong_buffer < 0:
            raise UserError("epsilon_high must be > 0 (or unset) and overlong_buffer >= 0")
        if self.max_refills < 0:
            raise UserError(f"max_refills must be >= 0 (refill batches of dynamic sampling), got {self.max_refills}")
        if self.beta < 0 or self.clip_eps <= 0 or self.temperature <= 0 or self.epochs < 1:
            raise UserError("beta must be >= 0; clip_eps, temperature and epochs must be > 0")

    def surrogate_and_aggregation(self) -> tuple[str, str]:
        """The per-token surrogate and the aggregation of the loss (losses/grpo.py) that loss_type names, else
        the clipped surrogate aggregated by loss_aggregation."""
        return LOSS_TYPES[self.loss_type] if self.loss_type else ("clip", self.loss_aggregation or "token")

    def refills(self) -> int:
        """Refill batches per step that dynamic sampling may draw (0: off)."""
        return self.max_refills if self.dynamic_sampling else 0


CONFIG = GRPOConfig
# --quick: the smoke-sized twin policy on 2-digit addition.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "steps": 8, "eval_every": 0, "eval_problems": 100,
         "kl_problems": 32}
# The real pretrained chat model, from the instruct model itself: 2-digit additions asked in words, one update
# per rollout batch of 128 completions (in 4 micro-batches, to hold the memory of their activations down),
# sized to the real-model track's 15 minutes on 2 CPU cores.
PRESETS = {"posttrain:smollm2-135m": {
    "difficulties": "2", "steps": 15, "prompts_per_step": 16, "num_generations": 8, "batch_size": 128, "grad_accum": 4,
    "temperature": 0.7, "lr": 1e-5, "beta": 0.0, "warmup_steps": 2, "eval_every": 5, "kl_problems": 32,
}}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's GRPOConfig learning rate
# (trl/trainer/grpo_config.py).
LARGE_MODEL = {"lr": 1e-6}


def run(cfg: GRPOConfig, resume: bool = False) -> dict:
    """Train by cfg's settings; the run, its summary and plots are named after cfg.METHOD (grpo or a named variant
    such as rloo or dapo, whose modules reuse this run)."""
    name = cfg.METHOD
    records = read_prompts(cfg.data, cfg.prompt_field, cfg.answer_field) if cfg.data else None  # bad data fails first
    reward_model = reward_model_path(cfg.reward, cfg.reward_model, cfg.model)  # orm/prm: built on first use
    reward_fn = reward_function(cfg.reward, reward_model, user_prompts=records is not None,
                                records=records, weights=tuple(cfg.reward_weights))  # a user's: loaded and tried
    held_answers = user_reward_answers(cfg, records)
    out = prepare_output(cfg.output_dir, resume)
    start_path = policy_path(cfg.model)
    model, tokenizer = load_model(start_path)
    if cfg.reward == "verifier" and has_chat_template(tokenizer):  # a chat model's reply: not world CoT's `A:` line
        reward_fn = answer_rewards
    if cfg.lora_r:  # the reference is then the policy with its adapters off: no second model
        lora.inject(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, seed=cfg.seed)
    reference = load_model(start_path)[0].requires_grad_(False) if cfg.beta and not cfg.lora_r else None
    pool = dataclasses.replace(cfg, steps=cfg.steps * (1 + cfg.refills()))  # dynamic sampling's refill prompts too
    held_out, prompts, answers = run_prompts(pool, records, tokenizer, start_path)
    probe = GeneralProbe.of(model, tokenizer) if uses_chat_world(tokenizer, cfg.data) else None  # what it loses
    baseline = {**held_out.measure(model, tokenizer, kl=False), **general_nll(probe, model, tokenizer)}
    baseline.update(held_out_reward(reward_fn, baseline, held_answers))

    accelerator = make_accelerator(cfg.precision)
    torch.manual_seed(cfg.seed)
    rows = cfg.prompts_per_step * cfg.num_generations
    updates = cfg.steps * cfg.epochs * -(-rows // cfg.batch_size)
    prepare_for_losses(model, cfg, reference)  # packed updates and reference passes
    policy = model  # for sampling and evaluation: no gradient sync there
    model = shard_for_training(policy, cfg, accelerator)  # itself, or its sharded copy (sharding=fsdp)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(dataclasses.replace(cfg, steps=updates)))
    model, optimizer = prepare_trained(accelerator, optimizer, model)
    compiled = compiled_forward(policy, cfg.compile)
    if reference is not None:
        reference = shard_frozen(reference.to(accelerator.device), cfg, accelerator)  # sharded beside the policy

    def update(rollouts):
        with forward_as(policy, compiled):  # the updates compiled if cfg.compile (sampling: its own decode step)
            return optimise(model, reference, optimizer, scheduler, accelerator, rollouts, cfg, held_out.max_new_tokens)

    loop = OnPolicy(
        name, cfg, cfg.num_generations, model, policy, tokenizer, reference, optimizer, scheduler, accelerator,
        held_out, prompts, answers, reward_fn, update,
        rollout_metrics=lambda rollouts: rollout_stats(rollouts, cfg),
        postfix=lambda m: {"reward": f"{m['reward']:.2f}", "kl": f"{m.get('kl', 0.0):.3f}"}, refills=cfg.refills(),
        sample_budget=cfg.steps * rows if cfg.equal_samples else None)
    start = {"step": 0, "accuracy": baseline["accuracy"], "kl": 0.0, "samples": 0}
    history, progress = train_on_policy(loop, out, start, resume)

    after = {**held_out.measure(policy, tokenizer, reference), **general_nll(probe, policy, tokenizer)}
    after.update(held_out_reward(reward_fn, after, held_answers))
    frontier = [*progress.frontier, {"step": progress.step, "accuracy": after["accuracy"], "kl": after["kl"],
                                     "samples": progress.samples}]
    save_policy(policy, tokenizer, out, start_path)
    write_samples(out / "samples.jsonl", after)
    if accelerator.is_main_process:
        training_curve(history, out / "training_curve.png", f"{name.upper()}: mean reward of the rollouts",
                       metric="reward", eval_metric="eval/accuracy")
    metrics = {**headline(after), "all_rewards_zero": progress.all_rewards_zero, "frontier": frontier,
               "completions_sampled": progress.step * rows, "samples_drawn": progress.samples,
               "rollout_batches": progress.step}
    result = TrainResult(history, history[-1], progress.elapsed, progress.tokens / progress.elapsed)
    summary = write_summary(out, name, cfg, metrics, headline(baseline), model, result, model_dir=str(out / "model"))
    remove_checkpoints(out, cfg)
    if accelerator.is_main_process:
        draw_frontier(out)
    return summary


def optimise(model, reference, optimizer, scheduler, accelerator, rollouts, cfg: GRPOConfig,
             completion_budget: int | None = None) -> dict:
    """`epochs` passes of minibatch updates over one rollout batch; returns the averaged metrics.
    completion_budget is the max_new_tokens the rollouts were sampled with (L_max of dr_grpo and the overlong
    penalty); without one, the batch's width."""
    device = accelerator.device
    batch = {k: v.to(device) for k, v in rollouts.batch.items()}
    mask = rollouts.mask.to(device)
    budget = completion_budget or mask.shape[1]
    advantages = rollout_advantages(rollouts, cfg, budget).to(device)
    minibatch = cfg.batch_size // accelerator.num_processes  # cfg.batch_size is global, over all ranks
    single_update = cfg.epochs == 1 and minibatch >= len(advantages)
    with torch.no_grad():
        # the sampling policy's log-probs; with a single update they equal the live ones (TRL skips them too)
        old_logp = None if single_update else forward_logprobs(model, batch)[0]
        ref_logp = reference_logprobs(model, reference, batch) if cfg.beta else None
    totals, count = {}, 0
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for rows in torch.randperm(len(advantages), generator=generator).split(minibatch):
            metrics = accumulate_gradients(model, batch, rows, old_logp, ref_logp, advantages, mask, accelerator, cfg,
                                           budget)
            if cfg.max_grad_norm:
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                metrics["grad_norm"] = sharding.as_float(norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals = {k: totals.get(k, 0.0) + v for k, v in metrics.items()}
            count += 1
    return {k: v / count for k, v in totals.items()}


def rollout_advantages(rollouts, cfg: GRPOConfig, completion_budget: int) -> torch.Tensor:
    """Advantages (N,) of the rollouts' rewards by cfg.advantage_estimator (rl/advantages.py), after DAPO's
    overlong penalty when cfg.overlong_buffer is set."""
    rewards = rollouts.rewards
    if cfg.overlong_buffer:
        rewards = rewards + overlong_penalty(rollouts.lengths, completion_budget, cfg.overlong_buffer)
    if cfg.advantage_estimator == "grpo":
        return group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    return ADVANTAGE_ESTIMATORS[cfg.advantage_estimator](rewards, cfg.num_generations)


def accumulate_gradients(model, batch, rows, old_logp, ref_logp, advantages, mask, accelerator, cfg,
                         completion_budget: int) -> dict:
    """The gradient of one minibatch's loss (`rows` of the rollout batch), summed over `cfg.grad_accum`
    micro-batches so that only one micro-batch's activations are alive at a time. Micro-batch m's mean
    loss L_m weighs n_m / N (its share of the minibatch's tokens, or completions for `sequence` and
    `constant`), so the sum is the gradient of the minibatch's mean, whatever the split (training.py's
    module docstring); the metrics are weighted alike."""
    surrogate, aggregation = cfg.surrogate_and_aggregation()
    aggregate = (partial(constant_mean, max_length=completion_budget) if aggregation == "constant"
                 else AGGREGATIONS[aggregation])
    units = (lambda r: mask[r].sum()) if aggregation == "token" else len  # what the loss averages (constant: rows)
    minibatch_units = units(rows)
    rank_share = share_of_all_processes(minibatch_units, accelerator)
    micro_batches = [micro for micro in rows.tensor_split(cfg.grad_accum) if len(micro)]
    totals = {}
    for i, micro in enumerate(micro_batches):
        weight = float(units(micro) / minibatch_units)
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # DDP reduces the gradients once
            logp, entropy = forward_logprobs(model, {k: v[micro] for k, v in batch.items()}, with_entropy=True)
            old_rows = logp.detach() if old_logp is None else old_logp[micro]
            ref_rows = ref_logp[micro] if ref_logp is not None else None
            loss, metrics = grpo_loss(logp, old_rows, ref_rows, advantages[micro], mask[micro],
                                      clip_eps=cfg.clip_eps, clip_eps_high=cfg.epsilon_high, beta=cfg.beta,
                                      aggregate=aggregate, importance_sampling=cfg.importance_sampling_level,
                                      surrogate=surrogate)
            metrics["entropy"] = masked_mean(entropy, mask[micro]).item()
            accelerator.backward(loss * weight * rank_share)
        totals = {k: totals.get(k, 0.0) + v * weight for k, v in metrics.items()}
    return totals


def rollout_stats(rollouts, cfg: GRPOConfig) -> dict:
    """reward_stats of the batch trained on; with dynamic sampling also the groups it left out."""
    dropped = {"groups_dropped": rollouts.groups_dropped} if cfg.dynamic_sampling else {}
    return {**reward_stats(rollouts.rewards, cfg.num_generations), **dropped}


def reward_stats(rewards: torch.Tensor, group_size: int) -> dict:
    """Mean and std of the rollout rewards and the share of groups that teach nothing (all equal)."""
    group_std = rewards.view(-1, group_size).std(-1)
    return {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
            "frac_reward_zero_std": (group_std == 0).float().mean().item()}
