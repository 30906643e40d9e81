"""Points of the reward-KL frontier: held-out accuracy, and how far the policy moved from the reference.

    accuracy   greedy chain-of-thought accuracy on held-out test problems (the verifier decides)
    kl         KL(pi || ref) of whole completions, in nats: the exact per-position KL (a sum over
               the vocabulary) added up along completions the policy samples at temperature 1.
               That is an unbiased estimate of the sequence KL with less noise than sampled
               log-ratios (k1), and it is never negative.

Every DPO/PPO/GRPO run measures one point at the start (kl = 0 by definition), a few during training
and one at the end; report/rl_plots.py draws them.
"""
from __future__ import annotations

import dataclasses

import torch

from posttrain.evaluation import evaluate, max_new_tokens_for
from posttrain.models import load_model
from posttrain.rl.kl import exact_kl
from posttrain.rl.rollouts import cot_prompts, sample_rollouts
from posttrain.world import MAIN_SKILL, sample_problems
from posttrain.world.skills import Problem


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
    """The held-out problems a run measures itself on, and where its reference policy is."""

    problems: list[Problem]  # greedy accuracy on these
    kl_prompts: list[str]  # KL to the reference on samples for these
    max_new_tokens: int
    reference_path: str  # loaded when measuring if no reference is kept in memory
    seed: int

    @classmethod
    def of(cls, tokenizer, difficulties, n: int, n_kl: int, reference_path: str, seed: int) -> "HeldOut":
        problems = sample_problems(MAIN_SKILL, difficulties, n, "test", seed)
        kl_prompts = cot_prompts(sample_problems(MAIN_SKILL, difficulties, n_kl, "val", seed))[0]
        return cls(problems, kl_prompts, max_new_tokens_for(tokenizer, problems, "cot"), reference_path, seed)

    def measure(self, model, tokenizer, reference=None, kl: bool = True) -> dict:
        """evaluation.evaluate's result on the problems (with their prompts) plus `kl` to the reference."""
        result = evaluate(model, tokenizer, self.problems, fmt="cot", max_new_tokens=self.max_new_tokens)
        result["prompts"] = cot_prompts(self.problems)[0]
        if kl:
            reference = reference if reference is not None else load_model(self.reference_path)[0].to(model.device)
            result["kl"] = reference_kl(model, reference, tokenizer, self.kl_prompts,
                                        max_new_tokens=self.max_new_tokens, seed=self.seed)
        return result
