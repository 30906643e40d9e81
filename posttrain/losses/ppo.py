"""PPO losses (Schulman et al. 2017): clipped surrogate, clipped value loss, entropy bonus.

Shapes: per-token tensors are (B, T) over completion positions, `mask` (B, T) is 1 on completion
tokens. Losses are means over all completion tokens of the batch.

    ratio_t   = pi(a_t|s_t) / pi_old(a_t|s_t) = exp(logp_t - old_logp_t)
    L_policy  = -mean_t min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)   (Eq. 7)
    L_value   = 1/2 mean_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)
    entropy   = mean_t H(pi(.|s_t))                                                 (Eq. 9, c2 term)
"""
from __future__ import annotations

import torch

from posttrain.rl.advantages import masked_mean


def clipped_surrogate_tokens(logp, old_logp, advantages, clip_eps: float):
    """(per-token loss (B, T), ratio (B, T)): -min(ratio * A, clip(ratio) * A) per token.

    Written as max of the two negated terms, which is the same thing and reads like the code in
    the PPO paper's reference implementation.
    """
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), ratio


def clipped_surrogate(logp, old_logp, advantages, mask, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped policy loss (Eq. 7), with clipfrac and approxkl as TRL logs them."""
    per_token, ratio = clipped_surrogate_tokens(logp, old_logp, advantages, clip_eps)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clipped = per_token > -advantages * ratio  # the clipped term is the one in force (TRL's definition)
        metrics = {
            "loss/policy": loss.item(),
            "policy/clipfrac": masked_mean(clipped.float(), mask).item(),
            "policy/approxkl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).item(),
        }
    return loss, metrics


def clipped_value_loss(values, old_values, returns, mask, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Value regression to the returns, with the update of V clipped to +-clip around V_old."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask).item()
    return loss, {"loss/value": loss.item(), "val/clipfrac": clipfrac}


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position: (B, T, V) -> (B, T)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bonus(entropies, mask) -> tuple[torch.Tensor, dict]:
    """Mean of the per-position entropies (`token_entropy`) over completion positions; the caller subtracts
    coef * it from the loss."""
    entropy = masked_mean(entropies, mask)
    return entropy, {"policy/entropy": entropy.item()}
