"""GRPO loss (Shao et al. 2024, DeepSeekMath, Eq. 3), with the KL term of Eq. 4, and its successors.

Per completion token t of completion i, with an advantage A_i (rl/advantages.py):

    ratio_it = pi(o_it) / pi_old(o_it)
    l_it     = -min(ratio_it * A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3_it
    k3_it    = ref(o_it)/pi(o_it) - log(ref(o_it)/pi(o_it)) - 1          (rl/kl.py)

eps_high = eps_low is the paper's symmetric clip; a larger eps_high is DAPO's clip-higher (Yu et al. 2025,
eps_high = 0.28), which lets a rare token with a positive advantage gain more probability per update.

Two other forms of the per-token term (`SURROGATES`):
    GSPO (Zheng et al. 2025, and its GSPO-token form): one ratio per completion, the geometric
        mean of its token ratios, s_i = exp(1/|o_i| sum_t log ratio_it), written per token as
            s_it = sg[s_i] * pi(o_it) / sg[pi(o_it)]
        which equals s_i and whose gradient is s_i * grad log pi(o_it), so that averaged over the tokens of a
        completion it is the gradient of s_i itself (`importance_sampling="sequence"`). The paper clips s_i far
        tighter than GRPO's token ratios (eps 3e-4 / 4e-4); clip_eps is not changed for it here.
    CISPO (MiniMax-M1, 2025): the importance weight is clipped and its gradient stopped, and the
        gradient flows only through log pi, so no token's update is dropped by the clip:
            l_it = -sg[min(ratio_it, 1 + eps_high)] * A_i * log pi(o_it)
        Like the paper's experiments, no lower bound on the weight. TRL's `epsilon_high` is the cap itself
        (5.0 in ScaleRL); here it is 1 + eps_high, the same meaning as for clip-higher.

How the l_it are averaged is a named choice (`AGGREGATIONS`, and `constant_mean`):
    token       sum_i,t l_it / sum_i |o_i|     every token weighs the same (DAPO; TRL "dapo", its default)
    sequence    1/G sum_i 1/|o_i| sum_t l_it   the paper's Eq. 3 (TRL "grpo"): long answers weigh less per token
    constant    sum_i,t l_it / (G * L_max)     Dr. GRPO (Liu et al. 2025, as its code; TRL "dr_grpo"):
                                               no length in the normaliser at all, L_max the completion budget

`LOSS_TYPES` names the combinations with TRL's `loss_type`. TRL's "bnpo" (a token mean per micro-batch) is
left out: posttrain weighs micro-batches so that an update never depends on the split, which makes it "dapo".

On several processes each rank's mean is weighted by its share of all ranks' tokens (or completions)
before DDP averages the gradients (`methods/rl/grpo.py`), so the sums run over every rank's rollouts.

Shapes: logp, old_logp, ref_logp, mask (N, T); advantages (N,).
"""
from __future__ import annotations

import torch

from posttrain.rl.advantages import masked_mean
from posttrain.rl.kl import kl_k3


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every completion token of the batch weighs the same."""
    return masked_mean(per_token, mask)


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each completion's tokens, then mean over completions (GRPO's Eq. 3)."""
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def constant_mean(per_token: torch.Tensor, mask: torch.Tensor, max_length: int) -> torch.Tensor:
    """Dr. GRPO: the sum over every completion token divided by N * max_length, a constant of the run."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / (mask.shape[0] * max_length)


AGGREGATIONS = {"token": token_mean, "sequence": sequence_mean}

# TRL's loss_type -> (per-token surrogate, aggregation); "constant" is constant_mean, which needs L_max
LOSS_TYPES = {
    "grpo": ("clip", "sequence"),
    "dapo": ("clip", "token"),
    "dr_grpo": ("clip", "constant"),
    "cispo": ("cispo", "token"),
}


def importance_ratio(logp, old_logp, mask, level: str = "token") -> torch.Tensor:
    """(N, T) ratio pi / pi_old per token ("token"), or GSPO's s_it ("sequence": s_i on every token of
    completion i, with the gradient of GSPO-token)."""
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    sequence_log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))  # (N, 1)
    return torch.exp(sequence_log_ratio.detach() + logp - logp.detach())


def clipped_tokens(ratio, logp, advantages, low: float, high: float) -> torch.Tensor:
    """-min(ratio * A, clip(ratio, low, high) * A) per token, as the max of the two negated terms."""
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(low, high))


def cispo_tokens(ratio, logp, advantages, low: float, high: float) -> torch.Tensor:
    """-sg[clip(ratio, low, high)] * A * log pi per token: the gradient flows through log pi alone."""
    return -ratio.clamp(low, high).detach() * advantages * logp


SURROGATES = {"clip": clipped_tokens, "cispo": cispo_tokens}


def ratio_bounds(surrogate: str, clip_eps: float, clip_eps_high: float | None) -> tuple[float, float]:
    """(low, high) of the ratio's clip: 1 - eps_low and 1 + eps_high; CISPO's weight has no lower bound."""
    high = 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    return (0.0 if surrogate == "cispo" else 1 - clip_eps), high


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float = 0.2, clip_eps_high: float | None = None,
              beta: float = 0.0, aggregate=token_mean, importance_sampling: str = "token",
              surrogate: str = "clip") -> tuple[torch.Tensor, dict]:
    """The GRPO objective, negated; `ref_logp` may be None when beta is 0 (no reference model kept).
    clip_eps_high None is the symmetric clip (clip_eps both ways)."""
    adv = advantages[:, None]  # (N, 1): one advantage for every token of a completion
    ratio = importance_ratio(logp, old_logp, mask, importance_sampling)  # (N, T)
    low, high = ratio_bounds(surrogate, clip_eps, clip_eps_high)
    per_token = SURROGATES[surrogate](ratio, logp, adv, low, high)  # (N, T)
    metrics = {}
    if beta:
        kl = kl_k3(logp, ref_logp)  # (N, T)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
    loss = aggregate(per_token, mask)
    with torch.no_grad():
        clipped_low = (ratio < low) & (adv < 0)  # clipped from below: the ratio cannot fall further
        clipped_high = (ratio > high) & (adv > 0)  # clipped from above
        metrics.update({
            "loss": loss.item(),
            "clip_ratio/low_mean": masked_mean(clipped_low.float(), mask).item(),
            "clip_ratio/high_mean": masked_mean(clipped_high.float(), mask).item(),
            "clip_ratio/region_mean": masked_mean((clipped_low | clipped_high).float(), mask).item(),
        })
    return loss, metrics
