"""Advantages: how much better an action was than expected.

    GAE (Schulman et al. 2016, Eq. 16), per token t of a completion, V = 0 after the last token:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lambda * A_{t+1}
        return_t = A_t + V_t                         (the value head's regression target)

    Group-normalised (GRPO, Shao et al. 2024, Sec. 4.1.2), G completions of one prompt:
        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
    Dr. GRPO (Liu et al. 2025) drops the division by std, which over-weights groups that are
    almost all right or all wrong:   A_i = r_i - mean(r_group)

    RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): the baseline of completion i
    is the mean reward of the G - 1 other completions of its prompt, so it is independent of the sample:
        A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) * (r_i - mean(r_group))

    REINFORCE++ (Hu 2025): no group baseline; the advantage is the reward normalised over the whole batch,
        A_i = (r_i - mean(r_batch)) / std(r_batch)
    and REINFORCE++-baseline (same paper; OpenRLHF's `reinforce_baseline`, verl's
    `reinforce_plus_plus_baseline`) subtracts the group mean first, then normalises over the batch:
        A_i = whiten_batch(r_i - mean(r_group))
    Departures: the paper and OpenRLHF whiten per token (each completion weighted by its length) and fold a k1
    KL penalty into the token rewards; here each completion counts once, the KL stays in the loss (beta, k3),
    and the batch is this process's rollouts.

    DAPO's overlong reward shaping (Yu et al. 2025, Sec. 3.4), for a completion of |y| tokens, budget L_max and a
    soft-penalty buffer L_cache, added to the reward before the advantages:
        R_length(y) = 0                                      |y| <= L_max - L_cache
                      ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
                      -1                                     L_max < |y|

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


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages (N,): each reward minus the mean of the other G - 1 of its group."""
    groups = rewards.view(-1, group_size)  # (P, G)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).flatten()


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, baseline: bool = False) -> torch.Tensor:
    """REINFORCE++ advantages (N,): the rewards whitened over the batch (population std); baseline=True is
    REINFORCE++-baseline, which subtracts each group's mean reward before whitening."""
    centred = group_advantages(rewards, group_size, scale=False) if baseline else rewards
    return whiten(centred, torch.ones_like(centred))


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++-baseline: the group mean subtracted, then whitened over the batch."""
    return reinforce_pp_advantages(rewards, group_size, baseline=True)


# name -> f(rewards (N,), group_size) -> advantages (N,): verl's `adv_estimator` choices, "++" for its "_plus_plus"
# ("grpo" is group_advantages, which also takes scale_rewards)
ADVANTAGE_ESTIMATORS = {
    "grpo": group_advantages,
    "rloo": rloo_advantages,
    "reinforce++": reinforce_pp_advantages,
    "reinforce++_baseline": reinforce_pp_baseline_advantages,
}


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment R_length (N,) for completion lengths (N,): 0 up to max_length - buffer
    tokens, then falling linearly to -1 at max_length, and -1 beyond it."""
    start = max_length - buffer  # where the penalty begins
    return ((start - lengths.to(torch.float32)) / max(buffer, 1)).clamp(-1.0, 0.0)
