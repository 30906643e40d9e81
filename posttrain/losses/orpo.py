"""Odds Ratio Preference Optimisation (ORPO, Hong et al. 2024): SFT and preference in one loss, no reference.

With the odds of a completion odds(y|x) = P(y|x) / (1 - P(y|x)), P the geometric mean of its token
probabilities (logp = the mean token log-prob), the paper's loss (Eqs. 6-7) on a pair is

    L = L_SFT + lambda * L_OR,    L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
    log odds(y|x) = logp - log(1 - exp(logp))

L_SFT is the chosen completion's NLL per token. The odds ratio needs no reference model: the SFT term
keeps the policy near the data, and the odds-ratio term only contrasts the pair. log(1 - exp(logp)) is
computed as log1p(-exp(logp)) below -log 2 and log(-expm1(logp)) above it, both accurate there (Maechler
2012; TRL's log1mexp). Unlike TRL, the mean log-prob is kept at most -1e-6: at logp = 0 the log odds
are infinite and their gradient NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_MEAN_LOGP = -1e-6  # a completion the model is this sure of already has odds of 1e6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) with log P = `mean_logp`, the completion's mean token log-prob, (B,)."""
    mean_logp = mean_logp.float().clamp(max=MAX_MEAN_LOGP)
    return mean_logp - log1mexp(mean_logp)


def odds_ratio_term(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor) -> torch.Tensor:
    """L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)), (B,)."""
    return -F.logsigmoid(log_odds(chosen_mean_logp) - log_odds(rejected_mean_logp))


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, chosen_nll: torch.Tensor,
              lam: float) -> torch.Tensor:
    """Per-pair ORPO loss L_SFT + lambda * L_OR, (B,), from mean token log-probs and the chosen NLL per token (B,)."""
    return chosen_nll + lam * odds_ratio_term(chosen_mean_logp, rejected_mean_logp)


@torch.no_grad()
def orpo_metrics(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, lam: float) -> dict:
    """What TRL's ORPOTrainer logs, under its names: rewards lambda * logp, the log odds ratio and
    log sigmoid of it, and the mean token log-probs (ORPO's log-probs are per token)."""
    ratio = log_odds(chosen_mean_logp) - log_odds(rejected_mean_logp)
    chosen, rejected = lam * chosen_mean_logp, lam * rejected_mean_logp
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "logps/chosen": chosen_mean_logp.mean().item(),
        "logps/rejected": rejected_mean_logp.mean().item(),
        "log_odds_ratio": F.logsigmoid(ratio).mean().item(),
        "log_odds_chosen": ratio.mean().item(),
    }
