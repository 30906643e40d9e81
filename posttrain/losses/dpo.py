"""Preference losses on (chosen, rejected) pairs: DPO and three variants, each its own function.

All work on summed completion log-probs (`PairLogps`, each (B,)) and return per-pair losses (B,).
With the implicit reward  r(y) = beta * (log pi(y|x) - log ref(y|x))  and the log-ratio margin

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

    dpo_sigmoid       -log sigmoid(beta * h)                              (Rafailov et al. 2023, Eq. 7)
    conservative_dpo  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
                      the labels are trusted only with probability 1 - e  (cDPO, Mitchell 2023)
    ipo               (h_avg - 1 / (2 beta))^2, h_avg the margin of per-token averaged log-ratios
                      (Azar et al. 2023, Eq. 17; averaged per token as TRL does, with the authors' word)
    simpo             -log sigmoid(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)
                      reference-free and length-normalised (Meng et al. 2024, Eq. 6)

`DPO_LOSSES` names them; a method picks one by name and binds its options. Any of them can be
combined with `chosen_nll`, the negative log-likelihood of the chosen completion per token, as in
RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1): on reasoning tasks
DPO alone tends to lower the log-probs of chosen and rejected completions together, and the NLL
term keeps the chosen ones likely.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class PairLogps:
    """Summed log-probs of each pair's completions, and their lengths in tokens: all (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def chosen_logratio(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    def rejected_logratio(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    def margin(self) -> torch.Tensor:
        """h = log-ratio of the chosen minus log-ratio of the rejected completion, (B,)."""
        return self.chosen_logratio() - self.rejected_logratio()


def dpo_sigmoid(p: PairLogps, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * p.margin())


def conservative_dpo(p: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    logits = beta * p.margin()
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo(p: PairLogps, beta: float) -> torch.Tensor:
    h_avg = p.chosen_logratio() / p.chosen_tokens.clamp(min=1) - p.rejected_logratio() / p.rejected_tokens.clamp(min=1)
    return (h_avg - 1 / (2 * beta)) ** 2  # pulls the margin to 1/(2 beta) instead of pushing it to infinity


def simpo(p: PairLogps, beta: float, gamma: float) -> torch.Tensor:
    chosen_avg = p.chosen / p.chosen_tokens.clamp(min=1)
    rejected_avg = p.rejected / p.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def chosen_nll(p: PairLogps) -> torch.Tensor:
    """-log pi(y_w|x) / |y_w| per pair, (B,): the SFT loss on the chosen completion."""
    return -p.chosen / p.chosen_tokens.clamp(min=1)


DPO_LOSSES = {"sigmoid": dpo_sigmoid, "cdpo": conservative_dpo, "ipo": ipo, "simpo": simpo}


@torch.no_grad()
def preference_metrics(p: PairLogps, beta: float) -> dict:
    """What TRL's DPOTrainer logs, under its names: implicit rewards, their margin and accuracy, log-probs."""
    chosen, rejected = beta * p.chosen_logratio(), beta * p.rejected_logratio()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "logps/chosen": p.chosen.mean().item(),
        "logps/rejected": p.rejected.mean().item(),
    }
