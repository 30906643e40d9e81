"""Knowledge-distillation losses: match the student's next-token distribution to the teacher's.

With temperature tau, p = softmax(z_teacher / tau) and q = softmax(z_student / tau) at each position:

    forward KL   KL(p || q) = sum_v p_v (log p_v - log q_v)    mean-seeking: q must cover all of p
    reverse KL   KL(q || p) = sum_v q_v (log q_v - log p_v)    mode-seeking: q may drop p's minor modes

Both are multiplied by tau^2 (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network",
Sec. 2): the soft targets' gradients scale as 1 / tau^2, so this keeps a loss of one size across
temperatures. The reverse form is the one MiniLLM (Gu et al. 2024) and GKD (Agarwal et al. 2024)
argue for in generative models. Averaged over the positions that carry a label (completion and EOS),
exactly where `sft_loss` averages; the position t predicts token t + 1.
Shapes: logits (B, T, V) for both models (same vocabulary), labels (B, T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.losses.sft import IGNORE


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(p_logits / tau) || softmax(q_logits / tau)) per position: (B, T, V) -> (B, T)."""
    log_p = F.log_softmax(p_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=-1)  # (B, T, V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)


def _masked_mean(per_token: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of per_token (B, T-1) over the labelled next-token positions; (mean, number of positions)."""
    mask = (labels[:, 1:] != IGNORE).float()  # (B, T-1)
    n_tokens = mask.sum().clamp(min=1)
    return (per_token * mask).sum() / n_tokens, n_tokens


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """tau^2 * mean_t KL(p_teacher || q_student): the student learns the teacher's soft targets."""
    per_token = token_kl(teacher_logits[:, :-1].detach(), student_logits[:, :-1], temperature)  # (B, T-1)
    kl, n_tokens = _masked_mean(per_token, labels)
    loss = temperature**2 * kl
    return loss, {"loss": loss.item(), "kl": kl.item(), "tokens": int(n_tokens)}


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """tau^2 * mean_t KL(q_student || p_teacher): the student puts its mass where the teacher's is."""
    per_token = token_kl(student_logits[:, :-1], teacher_logits[:, :-1].detach(), temperature)  # (B, T-1)
    kl, n_tokens = _masked_mean(per_token, labels)
    loss = temperature**2 * kl
    return loss, {"loss": loss.item(), "kl": kl.item(), "tokens": int(n_tokens)}


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}
