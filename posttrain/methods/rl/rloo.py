"""REINFORCE Leave-One-Out (RLOO, Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): GRPO's run with
the leave-one-out baseline in place of the group's normalisation.

    A_i = r_i - 1/(G-1) sum_{j != i} r_j          no division by the group's std (rl/advantages.py)

Settings are TRL 1.16's RLOOConfig's (trl/trainer/rloo_config.py): `beta` 0.05, advantages not normalised.
Departures: TRL's RLOOTrainer, as the paper, puts a k1 KL penalty into the reward and takes one ratio per
completion of its summed log-probs; here the k3 KL stays in the loss (beta) and the loss averages the tokens
(GRPO's default), which on-policy gives the same direction of gradient, A_i sum_t grad log pi(y_t), as TRL's.
The budget (steps, prompts, generations) is GRPO's, so the two compare at equal samples.

    posttrain rloo --output-dir runs/rloo
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from posttrain.methods.rl import grpo


@dataclasses.dataclass
class RLOOConfig(grpo.GRPOConfig):
    METHOD: ClassVar[str] = "rloo"
    output_dir: str = "runs/rloo"  # where summary.json, metrics.jsonl, plots and the model go
    advantage_estimator: str = "rloo"  # leave-one-out baseline (Ahmadian et al. 2024)
    beta: float = 0.05  # weight of the k3 KL to the reference (TRL's RLOOConfig)


CONFIG = RLOOConfig
QUICK, PRESETS, LARGE_MODEL = grpo.QUICK, grpo.PRESETS, grpo.LARGE_MODEL
run = grpo.run
