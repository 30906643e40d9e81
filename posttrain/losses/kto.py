"""Kahneman-Tversky Optimisation (KTO, Ethayarajh et al. 2024): preference learning from unpaired examples.

Each example is one completion labelled desirable or undesirable, no pair needed. With the implicit
reward r(x, y) = log pi(y|x) - log ref(y|x) and the reference point z0 (an estimate of KL(pi || ref)),
the paper's value function and loss are

    v(x, y) = w_D * sigmoid(beta * (r(x, y) - z0))    for a desirable y
              w_U * sigmoid(beta * (z0 - r(x, y)))    for an undesirable y
    L       = E[ w(y) - v(x, y) ]                       (w(y): w_D or w_U, the example's weight)

so a desirable completion's log-ratio is pushed above the reference point and an undesirable one's
below it, each through a sigmoid that saturates (the loss aversion of prospect theory, w_U > w_D, is
what the weights set). The reference point is not differentiated through: it is the mean log-ratio
of mismatched pairs (x, y'), the completion y' of another prompt, clamped at 0 because a KL is never
negative, as the paper estimates it and TRL's KTOTrainer does.
"""
from __future__ import annotations

import torch


def kl_reference_point(mismatched_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))) over mismatched pairs (B,), detached: a scalar."""
    return (mismatched_logps - mismatched_ref_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable_mask: torch.Tensor,
             kl_ref_point: torch.Tensor, beta: float, desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """Per-example KTO loss w(y) - v(x, y), (B,), from summed completion log-probs (B,) and the labels (B,) bool."""
    logratio = policy_logps - ref_logps  # r(x, y)
    desirable_value = desirable_weight * torch.sigmoid(beta * (logratio - kl_ref_point))
    undesirable_value = undesirable_weight * torch.sigmoid(beta * (kl_ref_point - logratio))
    weight = torch.where(desirable_mask, desirable_weight, undesirable_weight)
    return weight - torch.where(desirable_mask, desirable_value, undesirable_value)


@torch.no_grad()
def kto_metrics(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable_mask: torch.Tensor,
                kl_ref_point: torch.Tensor, beta: float) -> dict:
    """What TRL's KTOTrainer logs, under its names: the implicit rewards beta * r and log-probs of the desirable
    (chosen) and undesirable (rejected) examples, each kind only when the batch has one; and the reference
    point, TRL's `kl`, as `kl_ref_point` (a run's `kl` is its measured KL to the start policy)."""
    rewards = beta * (policy_logps - ref_logps)
    metrics = {"kl_ref_point": kl_ref_point.item()}
    for name, rows in (("chosen", desirable_mask), ("rejected", ~desirable_mask)):
        if rows.any():
            metrics[f"rewards/{name}"] = rewards[rows].mean().item()
            metrics[f"logps/{name}"] = policy_logps[rows].mean().item()
    return metrics
