"""Math-Shepherd process labels (Wang et al. 2024, "Math-Shepherd: Verify and reinforce LLMs step-by-step
without human annotations"): a reasoning step is labelled by what the policy can still reach from it,
not by a step checker.

From the solution's prefix that ends with step s, the policy samples K completions; o_{s,j} = 1 when
completion j reaches the right answer, else 0. The step's label is

    hard estimation   y_s = 1 if sum_j o_{s,j} >= 1 else 0     (some completion from here is right)
    soft estimation   y_s = (1/K) sum_j o_{s,j}                (the share of completions that are)

and the PRM is trained with BCE against y_s (a soft target for soft estimation). Both are Monte-Carlo
estimates of the step's value under the policy: hard asks whether the answer is still reachable, soft
estimates the chance of reaching it. A step the policy usually spoils later gets a low soft label even
when it is itself right; a wrong step from which the policy still recovers gets a high one.

Shapes: outcomes (..., K) of 0/1, one row per step prefix -> labels (...).
"""
from __future__ import annotations

import torch

MC_LABELS = ("hard", "soft")


def hard_labels(outcomes: torch.Tensor) -> torch.Tensor:
    """(...,): 1.0 where any of the K completions (last dim) reached the right answer, else 0.0."""
    return (outcomes > 0).any(-1).float()


def soft_labels(outcomes: torch.Tensor) -> torch.Tensor:
    """(...,): the share of the K completions (last dim) that reached the right answer."""
    return outcomes.float().mean(-1)


def mc_labels(outcomes: torch.Tensor, estimate: str) -> torch.Tensor:
    """Hard or soft estimation (`estimate`) of the step labels from completion outcomes (..., K)."""
    return {"hard": hard_labels, "soft": soft_labels}[estimate](outcomes)


def label_agreement(labels: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of steps where a label read as the PRM reads its probability (right when > 0.5) equals the
    reference label (0/1), e.g. the step checker's; labels and reference of the same shape."""
    return ((labels > 0.5) == reference.bool()).float().mean().item()
