"""Decoupled clip and Dynamic sAmpling Policy Optimization (DAPO, Yu et al. 2025): GRPO's run with the paper's
four changes and no KL term.

    clip-higher              ratio clipped to [1 - 0.2, 1 + 0.28]                      (Sec. 3.1; epsilon_high)
    dynamic sampling         groups whose rewards all agree dropped, fresh prompts sampled in their place
                             until the batch holds prompts_per_step informative groups (Sec. 3.2; rollouts.py)
    token-level loss         every token of the batch weighs the same                  (Sec. 3.3; loss_type=dapo)
    overlong shaping         a penalty ramping to -1 over the budget's last tokens     (Sec. 3.4; overlong_buffer)
    beta = 0                 no reference model, no KL                                  (Sec. 2.3)

The settings are the paper's as TRL 1.16 lists them (loss_type dapo, epsilon 0.2, epsilon_high 0.28, beta 0;
TRL has no dynamic sampling: verl's `filter_groups`). Departures: the overlong buffer is 8 tokens, the slack of the
world's completion budget over its longest solution (evaluation.max_new_tokens_for), where the paper's is 4,096 of
20,480; dynamic sampling draws at most `max_refills` more batches per step and then fills the batch with
uninformative groups (verl stops with an error). Prompts and generations per step are GRPO's, and with
`equal_samples` (on by default) the run stops once it has drawn what GRPO's `steps` batches draw
(steps x prompts_per_step x num_generations, refills included): fewer updates, each on informative groups only,
so the family compares at equal samples. `equal_samples=false` runs all `steps` and draws more.

    posttrain dapo --output-dir runs/dapo
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from posttrain.methods.rl import grpo


@dataclasses.dataclass
class DAPOConfig(grpo.GRPOConfig):
    METHOD: ClassVar[str] = "dapo"
    output_dir: str = "runs/dapo"  # where summary.json, metrics.jsonl, plots and the model go
    beta: float = 0.0  # no KL term, no reference model (DAPO Sec. 2.3)
    loss_type: str | None = "dapo"  # token-level loss (DAPO Sec. 3.3)
    epsilon_high: float | None = 0.28  # clip-higher: the ratio's upper clip 1 + this (DAPO Sec. 3.1)
    overlong_buffer: int = 8  # soft overlong penalty over the budget's last this many tokens (DAPO Sec. 3.4)
    dynamic_sampling: bool = True  # drop groups whose rewards all agree, refill from fresh prompts (DAPO Sec. 3.2)
    equal_samples: bool = True  # stop at GRPO's sample count (steps x prompts_per_step x num_generations)


CONFIG = DAPOConfig
QUICK, PRESETS, LARGE_MODEL = grpo.QUICK, grpo.PRESETS, grpo.LARGE_MODEL
run = grpo.run
