"""Rollouts: sample completions from the policy, score them, and lay them out as token tensors.

    prompts --generate(num_samples=G)--> completions --reward_fn(prompt, completion, answer)--> rewards (N,)
    prompt + completion ids, right-padded:        input_ids, attention_mask, labels (N, T)
    completion positions of token_logprobs' grid: mask (N, T-1)

Every per-token quantity of the RL losses (log-probs, values, advantages, KL) lives on that
(N, T-1) grid, where position t scores token t+1. The shared sampler shares one prompt prefill
across the G samples of a prompt. Rewards follow the world's contract: a function of the prompt,
the completion and the reference answer (posttrain.world.verify is one; world/answers.py the one of
prompts a user brings).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable

import torch

from posttrain import lora
from posttrain.data import pad_batch
from posttrain.errors import UserError
from posttrain.generation import generate, labelled_token_logprobs
from posttrain.losses.sft import IGNORE
from posttrain.rewards import is_user_reward, load_user_reward
from posttrain.world import MAIN_SKILL, render, sample_problems, verify
from posttrain.world.answers import answer_rewards
from posttrain.world.chat import chat_requests
from posttrain.world.skills import Problem

# The shared chain-of-thought SFT policy (posttrain.stages.policy) by name, so configs can say it
# (methods.common.policy_path resolves it).
POLICIES = {"sft-policy": False, "sft-policy-quick": True}

PROMPT_STREAM = 7919  # seed offset of RL training prompts (see training_problems)

RewardFn = Callable[[list[str], list[str], list[str]], list[float]]  # (prompts, completions, answers) -> rewards


def training_problems(difficulties, n: int, seed: int) -> list[Problem]:
    """`n` distinct training-split addition problems for RL prompts.

    The SFT policy's demonstrations were drawn from the same split with the run's seed; a different
    stream (seed + PROMPT_STREAM) gives problems it has not memorised (its accuracy on its own
    demonstrations is ~0.85 against ~0.45 on fresh ones, measured), where the reward says most.
    """
    return sample_problems(MAIN_SKILL, difficulties, n, "train", seed + PROMPT_STREAM)


def training_prompts(difficulties, records: list | None, n: int, seed: int,
                     chat: bool = False) -> tuple[list[str], list[str]]:
    """The `n` (prompt, reference answer) pairs an RL run trains on, in order: world addition problems
    (`training_problems`) as chain-of-thought prompts, or with `chat` as a chat model's requests, or the
    user's PromptRecords, each pass over them in a new seeded order."""
    if records is None:
        problems = training_problems(difficulties, n, seed)
        return chat_requests(problems) if chat else cot_prompts(problems)
    rng = random.Random(seed + PROMPT_STREAM)
    order = []
    while len(order) < n:
        order += rng.sample(records, len(records))
    return [r.prompt for r in order[:n]], [r.answer for r in order[:n]]


def cot_prompts(problems: list[Problem]) -> tuple[list[str], list[str]]:
    """(chain-of-thought prompts, reference answers) of world problems."""
    return [render(p, "cot")[0] for p in problems], [p.answer for p in problems]


def verifier_rewards(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """The world's outcome reward: 1.0 when the completion's answer is right, else 0.0."""
    return [verify(q, c, a) for q, c, a in zip(prompts, completions, answers)]


def reward_function(name: str, reward_model: str | None = None, user_prompts: bool = False,
                    records: list | None = None, weights: tuple[float, ...] = ()) -> RewardFn:
    """The reward a run optimises: a verifier (the world's, or with `user_prompts` the answer matcher of
    world/answers.py), the score of a learned reward model, or the user's own functions.

    For 'orm' / 'prm' the model is `reward_model` (a folder `posttrain reward` wrote: the ORM's reward,
    or the PRM's aggregate of step probabilities), resolved by the caller (methods.common.reward_model_path).
    `file.py:function` or `module:function` entries (comma-separated, summed with `weights`) are loaded
    and tried on the first of `records` now, before any model loads (posttrain/rewards.py); the
    records' other fields reach them as keyword columns.
    """
    if is_user_reward(name):
        return load_user_reward(name, weights, records)
    if name == "verifier":
        return answer_rewards if user_prompts else verifier_rewards
    if name not in ("orm", "prm"):
        raise UserError(f"reward must be verifier, orm, prm or FILE.py:FUNCTION, got '{name}'")
    from posttrain.reward_models import load_reward_model

    if reward_model is None:
        raise UserError(f"reward={name} needs reward_model=FOLDER (one `posttrain reward` wrote)")
    scorer = load_reward_model(reward_model)
    return lambda prompts, completions, answers: scorer.score(prompts, completions)


@dataclasses.dataclass
class Rollouts:
    """N = prompts x samples completions in prompt-major order, with their rewards and token tensors."""

    prompts: list[str]  # one per row
    texts: list[str]
    rewards: torch.Tensor  # (N,); zeros when nothing scored them
    batch: dict  # input_ids, attention_mask, labels: (N, T)
    stopped: list[bool]  # ended with EOS (False: cut at max_new_tokens)
    samples_drawn: int = 0  # completions sampled to make this batch (with dynamic sampling: more than N)
    groups_dropped: int = 0  # prompt groups sampled but left out, their rewards all equal (dynamic sampling)

    @property
    def mask(self) -> torch.Tensor:
        """(N, T-1): 1 where token_logprobs scores a completion token (EOS included)."""
        return (self.batch["labels"][:, 1:] != IGNORE).float()

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def row(self, i: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of row i without its padding, as data.encode_pair lays them out."""
        n = int(self.batch["attention_mask"][i].sum())
        return self.batch["input_ids"][i, :n].tolist(), self.batch["labels"][i, :n].tolist()


def rank_share(prompts: list, accelerator) -> list:
    """This process's share of a step's prompts (every num_processes-th, from its rank): each rank
    samples its own rollouts and DDP averages the ranks' gradients."""
    if len(prompts) % accelerator.num_processes:
        raise UserError(f"prompts per step ({len(prompts)}) must be divisible by the number of processes "
                        f"({accelerator.num_processes})")
    return prompts[accelerator.process_index :: accelerator.num_processes]


def rollout_seed(seed: int, step: int, accelerator) -> int:
    """A different sampling seed for every step and every rank (rank 0's is the single-process one)."""
    return seed * 1_000_003 + step + 7919 * accelerator.process_index


def step_rollouts(policy, tokenizer, prompts: list[str], answers: list[str], step: int, prompts_per_step: int, *,
                  num_samples: int, max_new_tokens: int, temperature: float, seed: int, reward_fn: RewardFn,
                  accelerator, decode: str = "dynamic", refills: int = 0, steps: int = 0) -> Rollouts:
    """This rank's rollouts of training step `step` (PPO and GRPO): its share of the step's prompts (of the
    run's `training_prompts`), sampled and scored.

    With `refills` > 0, DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2; verl's `filter_groups`): groups whose
    rewards all agree carry no advantage, so they are dropped and up to `refills` more batches are sampled
    until the step holds its share of informative groups. Refill r of step s is the rollout batch of the
    virtual step r * steps + s (its prompt window and its seed; `prompts` holds (refills + 1) * steps windows),
    so a resumed run draws the same refills. Departure: where verl stops with an error once its refills are
    spent, the batch is filled up with the dropped groups, in the order drawn, and trains on."""
    def batch(at: int) -> Rollouts:
        window = slice(at * prompts_per_step, (at + 1) * prompts_per_step)
        share = rank_share(prompts[window], accelerator), rank_share(answers[window], accelerator)
        return sample_rollouts(policy, tokenizer, *share, num_samples=num_samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=rollout_seed(seed, at, accelerator),
                               reward_fn=reward_fn, decode=decode)

    first = batch(step)
    if not refills:
        return first
    wanted = len(first.texts) // num_samples  # this rank's groups per step
    drawn = [first]
    while len(informative_groups(drawn, num_samples)) < wanted and len(drawn) <= refills:
        drawn.append(batch(len(drawn) * steps + step))
    return informative_batch(drawn, num_samples, wanted, tokenizer.pad_token_id)


def informative_groups(drawn: list[Rollouts], group_size: int) -> list[tuple[int, int]]:
    """(batch, group) of every group among the `drawn` batches whose rewards are not all equal, in order."""
    return [(b, g) for b, rollouts in enumerate(drawn)
            for g, rewards in enumerate(rollouts.rewards.view(-1, group_size)) if rewards.max() > rewards.min()]


def informative_batch(drawn: list[Rollouts], group_size: int, wanted: int, pad_id: int) -> Rollouts:
    """The first `wanted` informative groups of the `drawn` batches, topped up with uninformative ones (in the
    order drawn) when too few were found, as one batch; it counts every completion drawn and the groups left
    out."""
    informative = informative_groups(drawn, group_size)
    everything = [(b, g) for b, rollouts in enumerate(drawn) for g in range(len(rollouts.texts) // group_size)]
    chosen = (informative + [bg for bg in everything if bg not in informative])[:wanted]
    rows = [(b, g * group_size + i) for b, g in chosen for i in range(group_size)]
    sampled = sum(len(rollouts.texts) for rollouts in drawn)
    return Rollouts([drawn[b].prompts[i] for b, i in rows], [drawn[b].texts[i] for b, i in rows],
                    torch.stack([drawn[b].rewards[i] for b, i in rows]),
                    pad_batch([drawn[b].row(i) for b, i in rows], pad_id), [drawn[b].stopped[i] for b, i in rows],
                    samples_drawn=sampled, groups_dropped=sampled // group_size - wanted)


def sample_rollouts(model, tokenizer, prompts: list[str], answers: list[str] | None = None, *, num_samples: int,
                    max_new_tokens: int, temperature: float, seed: int, reward_fn: RewardFn = verifier_rewards,
                    decode: str = "dynamic") -> Rollouts:
    """Sample `num_samples` completions per prompt (`generate`'s `decode`); score them against `answers` if given."""
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       num_samples=num_samples, seed=seed, decode=decode)
    rows = [(prompt + ids, [IGNORE] * len(prompt) + ids) for prompt, ids in zip(samples.prompt_ids, samples.token_ids)]
    row_prompts = [q for q in prompts for _ in range(num_samples)]
    if answers is None:
        scores = [0.0] * len(rows)
    else:
        scores = reward_fn(row_prompts, samples.texts, [a for a in answers for _ in range(num_samples)])
    return Rollouts(row_prompts, samples.texts, torch.tensor(scores, dtype=torch.float32),
                    pad_batch(rows, tokenizer.pad_token_id), samples.stopped, samples_drawn=len(rows))


def forward_logprobs(model, batch: dict, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi of each completion token, and with `with_entropy` the entropy of the next-token distribution
    there, else None), both (N, T-1) and 0 where no completion token follows, of a right-padded batch.
    Logits only where a completion token follows (`labelled_token_logprobs`); the entropy has no gradient."""
    logp, entropy, _, _ = labelled_token_logprobs(model, batch, with_entropy)  # (M,): the M completion positions
    return on_completion_grid(logp, batch), on_completion_grid(entropy, batch) if with_entropy else None


def reference_logprobs(model, reference, batch: dict) -> torch.Tensor:
    """log ref(y_t) of each completion token, (N, T-1): the frozen reference's, or with LoRA (`reference`
    None) the policy's own with its adapters switched off, which is where training started."""
    if reference is not None:
        return forward_logprobs(reference, batch)[0]
    with lora.disabled(model):
        return forward_logprobs(model, batch)[0]


def on_completion_grid(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """(M,) values of the M positions that predict a completion token, row by row -> the (N, T-1) grid, 0 elsewhere."""
    scored = batch["labels"][:, 1:] != IGNORE  # (N, T-1)
    return values.new_zeros(scored.shape).masked_scatter(scored, values)


def completion_stats(rollouts: Rollouts) -> dict:
    """Completion lengths as TRL's GRPO trainer logs them; clipped: cut at max_new_tokens."""
    lengths = rollouts.lengths
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1 - sum(rollouts.stopped) / len(rollouts.stopped),
    }
