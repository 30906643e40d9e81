"""The outer loop every on-policy RL method shares (GRPO, PPO): sample, score, update, log, measure, checkpoint.

    for step in steps:
        rollouts = sample prompts_per_step x samples_per_prompt completions from the live policy, reward them
        metrics  = method.update(rollouts)         the method's own optimisation (grpo.optimise, ppo.optimise)
        every eval_every steps: held-out accuracy and KL to the reference (a point of the reward-KL frontier)
        every checkpoint_every steps, on Ctrl-C and on SIGTERM: a checkpoint at this rollout-batch boundary
                  (sharded: every rank stops after the same batch; training.interrupts_at_step_boundaries)
        stop early once `sample_budget` completions were drawn (dynamic sampling's refills count)

What a method brings is an `OnPolicy`: its models, optimizer and scheduler (prepared by the accelerator),
its `update`, and what it adds to each step's metrics. What differs between GRPO and PPO is only `update`.

Resuming (`--resume`) loads the checkpoint's trainable weights (the policy's and, for PPO, the value head's),
optimizer and scheduler, and continues at the next rollout batch. Every rollout batch is drawn with a seed
of (seed, step) (rollouts.rollout_seed) and every update shuffles with a generator of its own, so a resumed
run samples and updates as the uninterrupted one would, and ends with the same weights and metrics.

Under `sharding=fsdp` (posttrain/sharding.py) the updates train a sharded copy of the policy; each rollout
batch and held-out measurement first gathers its weights whole into `policy` (one all-gather of the model per
batch: ranks sampling their own prompts run different numbers of decode steps, which sharded forwards, each
a collective, cannot), and the loop ends with `policy` holding the trained weights.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from posttrain import sharding
from posttrain.errors import Interrupted, TrainingInterrupted, UserError, sigterm_as_interrupt
from posttrain.io import JsonlWriter, read_json, recover_dir
from posttrain.rewards import warn_if_all_zero
from posttrain.rollouts import Rollouts, completion_stats, step_rollouts
from posttrain.training import (CHECKPOINT, interrupts_at_step_boundaries, interrupts_held, load_checkpoint,
                                mean_over_processes, save_checkpoint, sum_over_processes)

PROGRESS = "progress.json"  # in the checkpoint: the loop's own state beside the weights and optimizer


@dataclasses.dataclass
class OnPolicy:
    """One on-policy run, as its method set it up."""

    name: str  # the method: progress bar, messages
    cfg: Any  # steps, prompts_per_step, temperature, seed, eval_every, checkpoint_every, rollout_decode
    samples_per_prompt: int
    model: torch.nn.Module  # the policy as trained: DDP-wrapped on several processes, its sharded copy under fsdp
    policy: torch.nn.Module  # the same policy unwrapped (gathered, under fsdp): sampling, evaluation, saving
    tokenizer: Any
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    held_out: Any  # heldout.HeldOut: the held-out problems, their completion budget, the KL probe
    prompts: list
    answers: list
    reward_fn: Callable
    update: Callable[[Rollouts], dict]  # the method's optimisation over one rollout batch; returns its metrics
    rollout_metrics: Callable[[Rollouts], dict] = lambda rollouts: {}  # what the method reports of a batch
    postfix: Callable[[dict], dict] = lambda metrics: {}  # the progress bar's figures
    trained: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)  # beside the policy (value head)
    refills: int = 0  # dynamic sampling (DAPO): refill batches replacing groups whose rewards agree (0: off)
    sample_budget: int | None = None  # stop before a rollout batch once this many completions were drawn


@dataclasses.dataclass
class Progress:
    """The loop's state: what a checkpoint holds beside the weights, the optimizer and the scheduler."""

    step: int = 0  # rollout batches done
    frontier: list = dataclasses.field(default_factory=list)  # held-out {step, accuracy, kl, samples} points so far
    tokens: int = 0  # tokens of the rollouts trained on
    elapsed: float = 0.0  # seconds of the loop, over every resumed part
    all_rewards_zero: bool = False  # the first rollout batch earned no reward at all
    samples: int = 0  # completions sampled for training so far, over all processes


def train_on_policy(run: OnPolicy, out: Path, start_point: dict, resume: bool) -> tuple[list[dict], Progress]:
    """Run `run.cfg.steps` rollout batches (or the rest of them, resuming); returns the logged metrics and the
    loop's final state. `start_point` is the frontier's first point, measured before training."""
    check_sharding_wired(run)
    ckpt = out / CHECKPOINT
    recover_dir(ckpt)  # a checkpoint write killed part-way
    progress = Progress(frontier=[start_point])
    if resume:
        progress = load_progress(ckpt, run)
    main_process = run.accelerator.is_main_process  # only rank 0 writes files
    writer = JsonlWriter(out / "metrics.jsonl", resume_step=progress.step) if main_process else None
    history = list(writer.resumed) if writer else []  # the metrics logged before an interruption
    bar = tqdm(total=run.cfg.steps, initial=progress.step, desc=run.name, disable=not main_process,
               dynamic_ncols=True)
    t0 = time.perf_counter() - progress.elapsed
    sharded = sharding.is_sharded(run.model)
    try:
        with sigterm_as_interrupt(), interrupts_at_step_boundaries(sharded) as stop_requested:
            for step in range(progress.step, run.cfg.steps):
                if run.sample_budget and progress.samples >= run.sample_budget:
                    if main_process:
                        bar.write(f"{run.name}: stopped after {step} rollout batches, having drawn "
                                  f"{progress.samples:,} completions of its budget of {run.sample_budget:,}")
                    break
                metrics = one_step(run, step, progress)
                progress.elapsed = time.perf_counter() - t0
                history.append(metrics)
                if writer:
                    writer.log(metrics)
                if run.cfg.checkpoint_every and progress.step % run.cfg.checkpoint_every == 0:
                    save_progress(ckpt, run, progress)  # every rank: a sharded policy is gathered from all
                bar.set_postfix(run.postfix(metrics))
                bar.update(1)
                if signum := stop_requested():
                    raise Interrupted(signum)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        progress.elapsed = time.perf_counter() - t0
        if main_process or sharded:  # a sharded policy's state is gathered from every rank
            save_progress(ckpt, run, progress)
        raise TrainingInterrupted(
            f"interrupted ({signal.Signals(signum).name}) after rollout batch {progress.step}; checkpoint saved in "
            f"{ckpt}. Run the same command with --resume to continue.", signum) from None
    finally:
        bar.close()
        if writer:
            writer.close()
    if sharded:
        sharding.fill(run.policy, run.model)  # the trained weights, for the final measurement and saving
    return history, progress


def check_sharding_wired(run: OnPolicy) -> None:
    """A method whose setup does not shard (`training.shard_for_training`) refuses `sharding=fsdp` on several
    processes rather than running as DDP."""
    if sharding.active(run.cfg, run.accelerator) and not sharding.is_sharded(run.model):
        raise UserError(f"sharding=fsdp is not available for {run.name}; use sharding=ddp (the default)")


def one_step(run: OnPolicy, step: int, progress: Progress) -> dict:
    """Sample and reward one rollout batch, update on it, and measure a frontier point when one is due."""
    cfg = run.cfg
    with sharding.gathered(run.policy, run.model):
        rollouts = step_rollouts(run.policy, run.tokenizer, run.prompts, run.answers, step, cfg.prompts_per_step,
                                 num_samples=run.samples_per_prompt, max_new_tokens=run.held_out.max_new_tokens,
                                 temperature=cfg.temperature, seed=cfg.seed, reward_fn=run.reward_fn,
                                 accelerator=run.accelerator, decode=cfg.rollout_decode, refills=run.refills,
                                 steps=cfg.steps)
    if step == 0:
        progress.all_rewards_zero = warn_if_all_zero(rollouts.rewards.tolist(), f"{run.name}'s first rollout batch")
    with interrupts_held(not sharding.is_sharded(run.model)):  # the update, the scheduler and the batch count together
        metrics = run.update(rollouts)
        progress.step = step + 1
        progress.tokens += int(rollouts.batch["attention_mask"].sum())
        drawn = int(sum_over_processes(torch.tensor(rollouts.samples_drawn, device=run.accelerator.device),
                                       run.accelerator))
        progress.samples += drawn
    metrics = mean_over_processes({**metrics, **run.rollout_metrics(rollouts), **completion_stats(rollouts)},
                                  run.accelerator)
    metrics = {"step": step + 1, **metrics, "samples_drawn": drawn, "lr": run.scheduler.get_last_lr()[0]}
    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
        with sharding.gathered(run.policy, run.model):
            point = run.held_out.measure(run.policy, run.tokenizer, run.reference)
        progress.frontier.append({"step": step + 1, "accuracy": point["accuracy"], "kl": point["kl"],
                                  "samples": progress.samples})
        metrics.update({"eval/accuracy": point["accuracy"], "eval/kl": point["kl"]})
    return metrics


def trained_modules(run: OnPolicy) -> torch.nn.ModuleDict:
    """Everything the optimizer updates, under one name each: what a checkpoint's weights hold (the sharded
    copy of the policy under fsdp)."""
    policy = run.model if sharding.is_sharded(run.model) else run.policy
    return torch.nn.ModuleDict({"policy": policy, **run.trained})


def save_progress(ckpt: Path, run: OnPolicy, progress: Progress) -> None:
    """A checkpoint at a rollout-batch boundary: trainable weights, optimizer, scheduler and the loop's state."""
    save_checkpoint(ckpt, trained_modules(run), run.optimizer, run.scheduler, progress.step,
                    extra={PROGRESS: dataclasses.asdict(progress)})


def load_progress(ckpt: Path, run: OnPolicy) -> Progress:
    """The checkpoint's weights, optimizer and scheduler loaded into the run; returns the loop's saved state."""
    if not (ckpt / "state.json").exists():
        raise UserError(f"--resume: no checkpoint in {ckpt.parent} (expected {ckpt}/state.json)")
    step = load_checkpoint(ckpt, trained_modules(run), run.optimizer, run.scheduler)
    try:
        progress = Progress(**read_json(ckpt / PROGRESS))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"checkpoint file {ckpt / PROGRESS} cannot be read ({exc}); it is not a {run.name} "
                        "checkpoint, or it was damaged: move it away to train from the start") from None
    if progress.step != step:
        raise UserError(f"checkpoint {ckpt}: its weights are of rollout batch {step}, its progress of "
                        f"{progress.step}; it was damaged: move it away to train from the start")
    return progress

