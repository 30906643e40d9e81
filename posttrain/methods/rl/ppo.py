"""Proximal Policy Optimisation for language models (Schulman et al. 2017; Ouyang et al. 2022, Sec. 3.5).

Actor-critic: a value head on the policy's last hidden state estimates how good each prefix is.

    for each step:
        sample completions of P training prompts from the current policy; score them (verifier or ORM)
        per-token reward   r_t = -kl_coef * (log pi(y_t) - log ref(y_t))  (+ the score on the last token)
        GAE(gamma, lambda) over completion tokens -> advantages (whitened) and value targets
        `epochs` passes of minibatches:
            loss = clipped surrogate + vf_coef * clipped value loss - ent_coef * entropy   (losses/ppo.py)

The start is the shared chain-of-thought SFT policy (posttrain.stages.policy: 4-digit addition, right
about two times in three, its errors the sloppy demonstrator's forgotten carry).
Departures from InstructGPT: the value head shares the policy's trunk (one forward gives both) instead
of a separate critic initialised from the reward model, and the default reward is the world's verifier
(1/0) rather than a learned reward model (`reward=orm` uses the outcome reward model). Every
`eval_every` steps the run measures held-out accuracy and KL to the SFT reference: its points on the
reward-KL frontier (reward_kl_frontier.png; `posttrain report` draws the methods side by side).

With `--data` the prompts are the user's (`{"prompt", "answer"}` records), as in GRPO: a seeded tenth held
out, measured by accuracy and by the mean reward of the run's reward function (`reward`), before and after.

    posttrain ppo --output-dir runs/ppo
    posttrain ppo kl_coef=0.2 epochs=2
    posttrain ppo --model ./my-policy --data prompts.jsonl
    posttrain ppo lora_r=8 lr=5e-4                   # LoRA; the KL penalty's reference is the adapters off

With `lora_r` > 0 only a LoRA update of `lora_targets` (and the value head) trains, and the KL
penalty's reference is the policy with its adapters switched off; with r = 8 and lr 5e-4 it ends
where full-weight PPO does, at a smaller KL.
"""
from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import save_file

from posttrain import lora, sharding
from posttrain.data import has_chat_template
from posttrain.errors import UserError
from posttrain.forward import labelled_forward
from posttrain.generation import labelled_token_logprobs, target_logprobs
from posttrain.lora import AdapterConfig
from posttrain.losses.ppo import clipped_surrogate, clipped_value_loss, entropy_bonus, token_entropy
from posttrain.methods.common import (headline, policy_path, prepare_output, remove_checkpoints, reward_model_path,
                                      save_policy, write_samples, write_summary)
from posttrain.models import load_model
from posttrain.onpolicy import OnPolicy, train_on_policy
from posttrain.records import read_prompts
from posttrain.rewards import check_reward_choice, held_out_reward, user_reward_answers
from posttrain.report.plots import training_curve
from posttrain.report.rl_plots import draw_frontier
from posttrain.rl.advantages import gae, masked_mean, whiten
from posttrain.world.answers import answer_rewards
from posttrain.heldout import run_prompts
from posttrain.rl.kl import kl_k1
from posttrain.rollouts import on_completion_grid, reference_logprobs, reward_function
from posttrain.training import (TrainingConfig, TrainResult, compiled_forward, forward_as, lr_lambda,
                                make_accelerator, make_optimizer, prepare_for_losses, prepare_trained, shard_frozen,
                                shard_for_training, share_of_all_processes, sum_over_processes)


@dataclasses.dataclass
class PPOConfig(AdapterConfig, TrainingConfig):
    model: str = "sft-policy"  # starting policy: sft-policy (shared CoT SFT model), a model folder or hub id
    data: str | None = None  # JSONL of prompt/answer records (a tenth held out); default: world addition problems
    output_dir: str = "runs/ppo"  # where summary.json, metrics.jsonl, plots and the model go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    max_new_tokens: int | None = None  # completion budget (default: the longest world solution + 8; 256 with data)
    reward: str = "verifier"  # verifier (1/0 outcome) | orm (the outcome reward model) | yours: a.py:func,pkg.mod:func
    reward_weights: list[float] = dataclasses.field(default_factory=list)  # per function of yours (default: 1 each)
    prompt_field: str = "prompt"  # the --data field holding the prompt (GSM8K: question)
    answer_field: str = "answer"  # the --data field holding the reference answer
    reward_model: str | None = None  # ORM folder for reward=orm (default: the cached `posttrain reward` one)
    prompts_per_step: int = 32  # training prompts per rollout batch
    samples_per_prompt: int = 4  # completions per prompt (one shared prefill)
    temperature: float = 1.0  # sampling temperature of the rollouts
    epochs: int = 2  # passes over each rollout batch
    kl_coef: float = 0.05  # beta of the per-token KL penalty in the reward
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    clip_eps: float = 0.2  # clip range of the probability ratio
    value_clip: float = 0.2  # clip range of the value update
    vf_coef: float = 0.1  # weight of the value loss (it shares the policy's trunk)
    value_lr: float = 1e-3  # learning rate of the value head (new weights learn faster than the tuned trunk)
    ent_coef: float = 0.0  # weight of the entropy bonus
    eval_every: int = 10  # steps between held-out accuracy/KL measurements (0: start and end only)
    eval_problems: int = 300  # held-out test problems for accuracy
    kl_problems: int = 100  # held-out prompts whose samples measure KL to the reference
    steps: int = 30  # rollout batches
    batch_size: int = 64  # completions per optimizer step (minibatch of a rollout batch)
    lr: float = 5e-5
    warmup_steps: int = 5
    min_lr_ratio: float = 1.0  # constant learning rate after warmup
    log_every: int = 1

    def validate(self) -> None:
        super().validate()
        check_reward_choice(self.reward, self.reward_weights, ("verifier", "orm"))
        if min(self.kl_coef, self.vf_coef, self.ent_coef) < 0 or self.clip_eps <= 0 or self.value_clip <= 0:
            raise UserError("kl_coef, vf_coef and ent_coef must be >= 0; clip_eps and value_clip > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise UserError("gamma and lam must be in [0, 1]")
        if self.temperature <= 0 or self.epochs < 1 or self.samples_per_prompt < 1:
            raise UserError("temperature must be > 0; epochs and samples_per_prompt >= 1")


CONFIG = PPOConfig
# --quick: the smoke-sized twin policy on 2-digit addition.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "steps": 8, "eval_every": 0, "eval_problems": 100,
         "kl_problems": 32}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): the learning rate of TRL's PPOConfig
# (trl.experimental.ppo, documented by TRL 1.16; the installed wheel ships no PPO trainer). The value head's
# value_lr stays: its weights are new.
LARGE_MODEL = {"lr": 3e-6}


class ValueHead(torch.nn.Module):
    """V(prefix) = w . h + b on the policy's last hidden state; starts at 0 so early advantages are returns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def forward_with_values(model, head, batch: dict, entropy_grad: bool = False):
    """(log-probs, values, entropies), each (N, T-1): at t, of the completion token t+1, of the prefix that emits
    it and of the distribution it is drawn from; 0 where no completion token follows. The output layer and
    the value head run only at those positions, packed if `packing.enable`d; the entropies carry a gradient
    only with `entropy_grad` (an entropy bonus), which needs the logits whole; otherwise past the model's
    logits budget they are built a chunk at a time (`labelled_token_logprobs`)."""
    if entropy_grad:
        logits, targets, _, hidden = labelled_forward(model, batch, hidden=True)  # (M, V), (M,), _, (M, H)
        per_position = (target_logprobs(logits, targets), head(hidden), token_entropy(logits))  # each (M,)
    else:
        logp, entropy, _, hidden = labelled_token_logprobs(model, batch, with_entropy=True, with_hidden=True)
        per_position = (logp, head(hidden), entropy)
    return tuple(on_completion_grid(x, batch) for x in per_position)


def run(cfg: PPOConfig, resume: bool = False) -> dict:
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
    reference = None if cfg.lora_r else load_model(start_path)[0].requires_grad_(False)
    head = ValueHead(model.config.hidden_size)
    held_out, prompts, answers = run_prompts(cfg, records, tokenizer, start_path)
    baseline = held_out.measure(model, tokenizer, kl=False)
    baseline.update(held_out_reward(reward_fn, baseline, held_answers))

    accelerator = make_accelerator(cfg.precision)
    torch.manual_seed(cfg.seed)
    rows = cfg.prompts_per_step * cfg.samples_per_prompt
    updates = cfg.steps * cfg.epochs * -(-rows // cfg.batch_size)
    prepare_for_losses(model, cfg, reference)  # packed updates and reference passes
    policy, value_head = model, head  # for sampling, evaluation and saving: no gradient sync there
    model, head = (shard_for_training(m, cfg, accelerator) for m in (policy, value_head))  # or sharded copies
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trained}, {"params": list(head.parameters()), "lr": cfg.value_lr}]
    optimizer = make_optimizer(groups, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(dataclasses.replace(cfg, steps=updates)))
    model, head, optimizer = prepare_trained(accelerator, optimizer, model, head)
    compiled = compiled_forward(policy, cfg.compile)
    if reference is not None:
        reference = shard_frozen(reference.to(accelerator.device), cfg, accelerator)  # sharded beside the policy

    def update(rollouts):
        with forward_as(policy, compiled):  # the updates compiled if cfg.compile (sampling: its own decode step)
            return optimise(model, head, reference, optimizer, scheduler, accelerator, rollouts, cfg)

    loop = OnPolicy(
        "ppo", cfg, cfg.samples_per_prompt, model, policy, tokenizer, reference, optimizer, scheduler, accelerator,
        held_out, prompts, answers, reward_fn, update,
        postfix=lambda m: {"score": f"{m['objective/scores']:.2f}", "kl": f"{m['objective/kl']:.2f}"},
        trained={"value_head": accelerator.unwrap_model(head)})
    start = {"step": 0, "accuracy": baseline["accuracy"], "kl": 0.0, "samples": 0}
    history, progress = train_on_policy(loop, out, start, resume)

    after = held_out.measure(policy, tokenizer, reference)
    after.update(held_out_reward(reward_fn, after, held_answers))
    frontier = [*progress.frontier, {"step": cfg.steps, "accuracy": after["accuracy"], "kl": after["kl"],
                                     "samples": progress.samples}]
    save_policy(policy, tokenizer, out, start_path)
    if sharding.is_sharded(head):
        sharding.fill(value_head, head)  # every rank: the trained value head whole
    if accelerator.is_main_process:
        save_file(value_head.state_dict(), str(out / "model" / "value_head.safetensors"))
    write_samples(out / "samples.jsonl", after)
    if accelerator.is_main_process:
        training_curve(history, out / "training_curve.png", "PPO: mean verifier score of the rollouts",
                       metric="objective/scores", eval_metric="eval/accuracy")
    metrics = {**headline(after), "all_rewards_zero": progress.all_rewards_zero, "frontier": frontier,
               "completions_sampled": cfg.steps * rows, "samples_drawn": progress.samples}
    result = TrainResult(history, history[-1], progress.elapsed, progress.tokens / progress.elapsed)
    summary = write_summary(out, "ppo", cfg, metrics, headline(baseline), model, result, model_dir=str(out / "model"))
    remove_checkpoints(out, cfg)
    if accelerator.is_main_process:
        draw_frontier(out)
    return summary


def optimise(model, head, reference, optimizer, scheduler, accelerator, rollouts, cfg: PPOConfig) -> dict:
    """Rewards, GAE, then `epochs` passes of minibatch PPO updates over one rollout batch."""
    device = accelerator.device
    batch = {k: v.to(device) for k, v in rollouts.batch.items()}
    mask, scores = rollouts.mask.to(device), rollouts.rewards.to(device)
    with torch.no_grad():
        old_logp, old_values, _ = forward_with_values(model, head, batch)
        ref_logp = reference_logprobs(model, reference, batch)
        kl = kl_k1(old_logp, ref_logp) * mask  # (N, T-1)
        rewards = -cfg.kl_coef * kl
        last = mask.cumsum(-1).argmax(-1)  # index of each completion's last token (EOS)
        rewards[torch.arange(len(scores)), last] += scores
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask, total=lambda t: sum_over_processes(t, accelerator))  # every rank's
    stats = rollout_stats(scores, kl, old_logp, old_values, returns, mask, cfg.kl_coef)

    totals, count = {}, 0
    generator = torch.Generator().manual_seed(cfg.seed)
    minibatch = cfg.batch_size // accelerator.num_processes  # cfg.batch_size is global, over all ranks
    for _ in range(cfg.epochs):
        for rows in torch.randperm(len(scores), generator=generator).split(minibatch):
            mini = {k: v[rows] for k, v in batch.items()}
            logp, values, entropies = forward_with_values(model, head, mini, entropy_grad=cfg.ent_coef > 0)
            pg_loss, pg_metrics = clipped_surrogate(logp, old_logp[rows], advantages[rows], mask[rows], cfg.clip_eps)
            vf_loss, vf_metrics = clipped_value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.value_clip)
            entropy, ent_metrics = entropy_bonus(entropies, mask[rows])
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy  # each a mean over the tokens
            accelerator.backward(loss * share_of_all_processes(mask[rows].sum(), accelerator))
            metrics = {"loss": loss.item(), **pg_metrics, **vf_metrics, **ent_metrics}
            if cfg.max_grad_norm:
                trained = list(model.parameters()) + list(head.parameters())
                metrics["grad_norm"] = sharding.as_float(accelerator.clip_grad_norm_(trained, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals = {k: totals.get(k, 0.0) + v for k, v in metrics.items()}
            count += 1
    return {**stats, **{k: v / count for k, v in totals.items()}}


def rollout_stats(scores, kl, logp, values, returns, mask, kl_coef: float) -> dict:
    """What TRL's PPO trainer logs about a rollout batch, before it is optimised on."""
    kl_per_completion = kl.sum(-1)  # (N,)
    residual = returns - values
    explained = 1 - masked_mean((residual - masked_mean(residual, mask)) ** 2, mask) / \
        masked_mean((returns - masked_mean(returns, mask)) ** 2, mask).clamp(min=1e-8)
    return {
        "objective/scores": scores.mean().item(),
        "objective/kl": kl_per_completion.mean().item(),
        "objective/entropy": (-logp * mask).sum(-1).mean().item(),  # sampled estimate, nats per completion
        "objective/rlhf_reward": (scores - kl_coef * kl_per_completion).mean().item(),
        "val/explained_variance": explained.item(),
        "val/mean": masked_mean(values, mask).item(),
    }
