"""REINFORCE++ (Hu 2025): GRPO's run with no group baseline; each advantage is the reward normalised over the
whole rollout batch, the critic-free policy gradient with PPO's clipped ratio.

    A_i = (r_i - mean(r_batch)) / std(r_batch)          (rl/advantages.py)

Departures (rl/advantages.py): the paper and OpenRLHF whiten per token and fold a k1 KL penalty into the
token rewards; here each completion counts once, the k3 KL stays in the loss at GRPO's `beta`, and the batch is
this process's rollouts. The budget (steps, prompts, generations) is GRPO's, so the two compare at equal samples.

    posttrain reinforce-pp --output-dir runs/reinforce-pp
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from posttrain.methods.rl import grpo


@dataclasses.dataclass
class ReinforcePPConfig(grpo.GRPOConfig):
    METHOD: ClassVar[str] = "reinforce-pp"
    output_dir: str = "runs/reinforce-pp"  # where summary.json, metrics.jsonl, plots and the model go
    advantage_estimator: str = "reinforce++"  # rewards whitened over the batch (Hu 2025)


CONFIG = ReinforcePPConfig
QUICK, PRESETS, LARGE_MODEL = grpo.QUICK, grpo.PRESETS, grpo.LARGE_MODEL
run = grpo.run
