"""Reward-model losses: Bradley-Terry on preference pairs, BCE on outcomes, per-step BCE for a PRM.

Outcome reward model (ORM), one scalar r per solution, read at its last token:

    L_BT  = -mean_pairs log sigmoid(r_chosen - r_rejected)          (Bradley & Terry 1952; the reward
                                                                      loss of Ouyang et al. 2022, Eq. 1)
    L_BCE = -mean_i [y_i log sigmoid(r_i) + (1 - y_i) log(1 - sigmoid(r_i))]   y_i = verifier outcome

Process reward model (PRM), one logit per reasoning step, read at the token that ends the step:

    L_PRM = -mean_steps [y_s log sigmoid(v_s) + (1 - y_s) log(1 - sigmoid(v_s))]   (Lightman et al. 2023)

A solution's PRM score combines its steps' probabilities p_s = sigmoid(v_s): the minimum (the
weakest step decides) or the product (the chance that every step is right, the paper's choice).
Shapes: pair rewards (P,), step logits/labels/mask (B, S) with mask 1 on real steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """-mean log sigmoid(r_chosen - r_rejected), with pairwise accuracy and mean margin."""
    margin = r_chosen - r_rejected  # (P,)
    loss = -F.logsigmoid(margin).mean()  # logsigmoid, not log(sigmoid()): stable for large |margin|
    return loss, {"bt_loss": loss.item(), "pair_accuracy": (margin > 0).float().mean().item(),
                  "margin": margin.mean().item()}


def outcome_bce_loss(rewards: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Binary cross-entropy of sigmoid(reward) against 1/0 correctness, rewards and labels (B,)."""
    loss = F.binary_cross_entropy_with_logits(rewards, labels.float())
    return loss, {"bce_loss": loss.item()}


def prm_step_loss(step_logits: torch.Tensor, step_labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean BCE over real steps (mask 1), with step accuracy at the 0.5 threshold; all inputs (B, S)."""
    mask = mask.float()
    per_step = F.binary_cross_entropy_with_logits(step_logits, step_labels.float(), reduction="none")  # (B, S)
    n_steps = mask.sum().clamp(min=1)
    loss = (per_step * mask).sum() / n_steps
    right = ((step_logits > 0) == (step_labels > 0.5)).float()  # soft labels (a share) read as right above 0.5
    return loss, {"prm_loss": loss.item(), "step_accuracy": ((right * mask).sum() / n_steps).item()}


def min_score(step_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,): the smallest step probability of each solution (padding steps count as 1)."""
    return step_probs.masked_fill(~mask.bool(), 1.0).min(-1).values


def product_score(step_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,): the product of step probabilities, P(every step right) if steps were independent."""
    return step_probs.masked_fill(~mask.bool(), 1.0).prod(-1)


# How a PRM turns step probabilities into one solution score (config `prm_aggregate`).
AGGREGATES = {"min": min_score, "product": product_score}
