"""Advantages: how much better an action was than expected.

    GAE (Schulman et al. 2016, Eq. 16), per token t of a completion, V = 0 after the last token:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lambda * A_{t+1}
        return_t = A_t + V_t                         (the value head's regression target)

    Group-normalised (GRPO, Shao et al. 2024, Sec. 4.1.2), G completions of one prompt:
        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
    Dr. GRPO (Liu et al. 2025) drops the division by std, which over-weights groups that are
    almost all right or all wrong:   A_i = r_i - mean(r_group)

    Whitening: A <- (A - mean(A)) / std(A) over the batch's completion tokens (PPO's usual step).
"""
from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), each (B, T), from per-token rewards, values and a completion mask (B, T).

    Completions are right-padded: positions where mask is 0 come after the last token and count
    as terminal (their value and reward are taken as 0).
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # A_{t+1}, (B,)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (any shape)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=lambda t: t) -> torch.Tensor:
    """Zero mean, unit variance over the masked positions; masked-out positions become 0. `total` sums a
    tensor over processes (the identity on one), so that the moments are those of every rank's positions."""
    mask = mask.to(x.dtype)
    count = total(mask.sum()).clamp(min=1)
    mean = total((x * mask).sum()) / count
    var = total(((x - mean) ** 2 * mask).sum()) / count
    return (x - mean) * torch.rsqrt(var + eps) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages (N,) of N = P * G rewards in prompt-major order (rows i*G .. i*G+G-1 share a prompt).

    scale=False is Dr. GRPO: the group mean is subtracted but the std is not divided out.
    The std is the sample std (n - 1), as in DeepSeekMath's and TRL's implementations.
    """
    groups = rewards.view(-1, group_size)  # (P, G)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.flatten()
