"""Group Sequence Policy Optimization (GSPO, Zheng et al. 2025): GRPO's run with one importance ratio per
completion, the geometric mean of its tokens' ratios, clipped in a range of a few 1e-4.

    s_i = exp(1/|y_i| sum_t log pi(y_i,t) / pi_old(y_i,t)),    loss = -min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i)

The settings are TRL 1.16's reproduction of the paper (its paper index: importance_sampling_level sequence,
loss_type grpo, beta 0, epsilon 3e-4, epsilon_high 4e-4 from the paper's Sec. 5.1, and 4 minibatches per rollout
batch, which GRPO's batch_size of 32 of 16 x 8 completions already gives). Only the updates after a rollout
batch's first minibatch are off-policy, so only they see the ratio differ from 1. The budget (steps, prompts,
generations) is GRPO's, so the two compare at equal samples.

    posttrain gspo --output-dir runs/gspo
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from posttrain.methods.rl import grpo


@dataclasses.dataclass
class GSPOConfig(grpo.GRPOConfig):
    METHOD: ClassVar[str] = "gspo"
    output_dir: str = "runs/gspo"  # where summary.json, metrics.jsonl, plots and the model go
    beta: float = 0.0  # no KL term, no reference model (TRL's GSPO setting)
    clip_eps: float = 3e-4  # lower clip of the sequence ratio: 1 - this (GSPO Sec. 5.1)
    epsilon_high: float | None = 4e-4  # upper clip of the sequence ratio: 1 + this (GSPO Sec. 5.1)
    loss_type: str | None = "grpo"  # each completion's token mean, then the mean over completions
    importance_sampling_level: str = "sequence"  # one ratio per completion, the geometric mean of its tokens' ratios


CONFIG = GSPOConfig
QUICK, PRESETS, LARGE_MODEL = grpo.QUICK, grpo.PRESETS, grpo.LARGE_MODEL
run = grpo.run
