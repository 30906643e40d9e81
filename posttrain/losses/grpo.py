"""GRPO loss (Shao et al. 2024, DeepSeekMath, Eq. 3), with the KL term of Eq. 4.

Per completion token t of completion i, with a group-normalised advantage A_i (rl/advantages.py):

    ratio_it = pi(o_it) / pi_old(o_it)
    l_it     = -min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps) * A_i) + beta * k3_it
    k3_it    = ref(o_it)/pi(o_it) - log(ref(o_it)/pi(o_it)) - 1          (rl/kl.py)

How the l_it are averaged is a named choice (`AGGREGATIONS`):
    token       sum_i,t l_it / sum_i |o_i|     every token weighs the same (DAPO; TRL "dapo", its default)
    sequence    1/G sum_i 1/|o_i| sum_t l_it   the paper's Eq. 3 (TRL "grpo"): long answers weigh less per token

On several processes each rank's mean is weighted by its share of all ranks' tokens (or completions)
before DDP averages the gradients (`methods/rl/grpo.py`), so the sums run over every rank's rollouts.

Shapes: logp, old_logp, ref_logp, mask (N, T); advantages (N,).
"""
from __future__ import annotations

import torch

from posttrain.losses.ppo import clipped_surrogate_tokens
from posttrain.rl.advantages import masked_mean
from posttrain.rl.kl import kl_k3


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every completion token of the batch weighs the same."""
    return masked_mean(per_token, mask)


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each completion's tokens, then mean over completions (GRPO's Eq. 3)."""
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


AGGREGATIONS = {"token": token_mean, "sequence": sequence_mean}


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float = 0.2, beta: float = 0.0,
              aggregate=token_mean) -> tuple[torch.Tensor, dict]:
    """The GRPO objective, negated; `ref_logp` may be None when beta is 0 (no reference model kept)."""
    adv = advantages[:, None]  # (N, 1): one advantage for every token of a completion
    per_token, ratio = clipped_surrogate_tokens(logp, old_logp, adv, clip_eps)  # (N, T)
    metrics = {}
    if beta:
        kl = kl_k3(logp, ref_logp)  # (N, T)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
    loss = aggregate(per_token, mask)
    with torch.no_grad():
        low = (ratio < 1 - clip_eps) & (adv < 0)  # clipped from below: the ratio cannot fall further
        high = (ratio > 1 + clip_eps) & (adv > 0)  # clipped from above
        metrics.update({
            "loss": loss.item(),
            "clip_ratio/low_mean": masked_mean(low.float(), mask).item(),
            "clip_ratio/high_mean": masked_mean(high.float(), mask).item(),
            "clip_ratio/region_mean": masked_mean((low | high).float(), mask).item(),
        })
    return loss, metrics
