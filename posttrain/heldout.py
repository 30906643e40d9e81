"""Points of the reward-KL frontier: held-out accuracy, and how far the policy moved from the reference.

    accuracy   greedy chain-of-thought accuracy on held-out test problems (the verifier decides), or,
               asked as requests, a chat model's (world/chat.py), or on the held-out share of a user's
               prompts (`--data`); world/answers.py decides those two
    kl         KL(pi || ref) of whole completions, in nats: the exact per-position KL (a sum over
               the vocabulary) added up along completions the policy samples at temperature 1.
               That is an unbiased estimate of the sequence KL with less noise than sampled
               log-ratios (k1), and it is never negative.

Every DPO/PPO/GRPO run measures one point at the start (kl = 0 by definition), a few during training
and one at the end; report/rl_plots.py draws them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from posttrain.chat_world import CHAT_MAX_NEW_TOKENS
from posttrain.data import has_chat_template
from posttrain.evaluation import evaluate, evaluate_answers, max_new_tokens_for
from posttrain.models import load_model
from posttrain.records import PromptRecord, split_records
from posttrain.rl.kl import exact_kl
from posttrain.rollouts import cot_prompts, sample_rollouts, training_prompts
from posttrain.world import MAIN_SKILL, sample_problems
from posttrain.world.chat import chat_requests


@torch.no_grad()
def reference_kl(model, reference, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int) -> float:
    """Mean KL(pi || ref) of one sampled completion per prompt, in nats per completion."""
    rollouts = sample_rollouts(model, tokenizer, prompts, num_samples=1, max_new_tokens=max_new_tokens,
                               temperature=1.0, seed=seed)
    batch = {k: v.to(next(model.parameters()).device) for k, v in rollouts.batch.items()}
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    per_position = exact_kl(logits[:, :-1], ref_logits[:, :-1])  # (N, T-1)
    return float((per_position * rollouts.mask.to(per_position.device)).sum(-1).mean())


@dataclasses.dataclass
class HeldOut:
    """The held-out prompts a run measures itself on, and where its reference policy is."""

    greedy: Callable  # (model, tokenizer) -> greedy accuracy, completions, verdicts and prompts (evaluate's keys)
    kl_prompts: list[str]  # KL to the reference on samples for these
    max_new_tokens: int
    reference_path: str  # loaded when measuring if no reference is kept in memory
    seed: int

    @classmethod
    def of(cls, tokenizer, difficulties, n: int, n_kl: int, reference_path: str, seed: int,
           max_new_tokens: int | None = None) -> "HeldOut":
        """World addition problems of the test split, asked for chain-of-thought solutions."""
        problems = sample_problems(MAIN_SKILL, difficulties, n, "test", seed)
        kl_prompts = cot_prompts(sample_problems(MAIN_SKILL, difficulties, n_kl, "val", seed))[0]
        budget = max_new_tokens or max_new_tokens_for(tokenizer, problems, "cot")

        def greedy(model, tokenizer) -> dict:
            result = evaluate(model, tokenizer, problems, fmt="cot", max_new_tokens=budget)
            return {**result, "prompts": cot_prompts(problems)[0]}

        return cls(greedy, kl_prompts, budget, reference_path, seed)

    @classmethod
    def of_chat(cls, difficulties, n: int, n_kl: int, reference_path: str, seed: int, max_new_tokens: int) -> "HeldOut":
        """World addition problems of the test split asked as a chat model's requests (world/chat.py),
        the answers read from its replies by world/answers.py."""
        prompts, answers = chat_requests(sample_problems(MAIN_SKILL, difficulties, n, "test", seed))
        kl_prompts = chat_requests(sample_problems(MAIN_SKILL, difficulties, n_kl, "val", seed))[0]
        held_out = cls.of_records([PromptRecord(q, a) for q, a in zip(prompts, answers)], 0, reference_path, seed,
                                  max_new_tokens)
        return dataclasses.replace(held_out, kl_prompts=kl_prompts)

    @classmethod
    def of_records(cls, records: list, n_kl: int, reference_path: str, seed: int, max_new_tokens: int) -> "HeldOut":
        """A user's held-out PromptRecords, their answers checked by world/answers.py; KL on the first `n_kl`."""
        prompts, answers = [r.prompt for r in records], [r.answer for r in records]

        def greedy(model, tokenizer) -> dict:
            return evaluate_answers(model, tokenizer, prompts, answers, max_new_tokens)

        return cls(greedy, prompts[:n_kl], max_new_tokens, reference_path, seed)

    def measure(self, model, tokenizer, reference=None, kl: bool = True) -> dict:
        """Greedy accuracy on the held-out prompts (with completions and prompts), plus `kl` to the reference."""
        result = self.greedy(model, tokenizer)
        if kl:
            reference = reference if reference is not None else load_model(self.reference_path)[0].to(model.device)
            result["kl"] = reference_kl(model, reference, tokenizer, self.kl_prompts,
                                        max_new_tokens=self.max_new_tokens, seed=self.seed)
        return result


DATA_MAX_NEW_TOKENS = 256  # completion budget of rollouts and evaluation on a user's prompts, unless set


def run_prompts(cfg, records: list | None, tokenizer, start_path: str) -> tuple[HeldOut, list[str], list[str]]:
    """A PPO or GRPO run's held-out measurement and its steps x prompts_per_step training (prompts, answers):
    world addition problems (asked as requests when its tokenizer has a chat template), or the user's
    PromptRecords with a seeded tenth held out (at most eval_problems of them measured)."""
    n = cfg.steps * cfg.prompts_per_step
    if records is None and has_chat_template(tokenizer):
        held_out = HeldOut.of_chat(cfg.difficulties, cfg.eval_problems, cfg.kl_problems, start_path, cfg.seed,
                                   cfg.max_new_tokens or CHAT_MAX_NEW_TOKENS)
        return (held_out, *training_prompts(cfg.difficulties, None, n, cfg.seed, chat=True))
    if records is None:
        held_out = HeldOut.of(tokenizer, cfg.difficulties, cfg.eval_problems, cfg.kl_problems, start_path, cfg.seed,
                              cfg.max_new_tokens)
        return (held_out, *training_prompts(cfg.difficulties, None, n, cfg.seed))
    train, held = split_records(records, cfg.seed)
    held_out = HeldOut.of_records(held[: cfg.eval_problems], cfg.kl_problems, start_path, cfg.seed,
                                  cfg.max_new_tokens or DATA_MAX_NEW_TOKENS)
    return (held_out, *training_prompts(None, train, n, cfg.seed))
