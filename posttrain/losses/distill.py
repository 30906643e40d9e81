"""Knowledge-distillation losses: match the student's next-token distribution to the teacher's.

With temperature tau, p = softmax(z_teacher / tau) and q = softmax(z_student / tau) at each position:

    forward KL   KL(p || q) = sum_v p_v (log p_v - log q_v)    mean-seeking: q must cover all of p
    reverse KL   KL(q || p) = sum_v q_v (log q_v - log p_v)    mode-seeking: q may drop p's minor modes

Both are multiplied by tau^2 (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network",
Sec. 2): the soft targets' gradients scale as 1 / tau^2, so this keeps a loss of one size across
temperatures. The reverse form is the one MiniLLM (Gu et al. 2024) and GKD (Agarwal et al. 2024)
argue for in generative models. Averaged over the positions whose next token carries a label
(completion and EOS), exactly where `sft_loss` averages. Shapes: logits (N, V) for both models at
those N positions (same vocabulary; `posttrain.forward.labelled_logits` gives them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(p_logits / tau) || softmax(q_logits / tau)) per position: (N, V) -> (N,)."""
    log_p = F.log_softmax(p_logits.float() / temperature, dim=-1)  # (N, V)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=-1)  # (N, V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)


def _scaled_mean(per_token: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict]:
    """tau^2 * the mean over positions, and its metrics."""
    kl = per_token.sum() / max(len(per_token), 1)
    loss = temperature**2 * kl
    return loss, {"loss": loss.item(), "kl": kl.item(), "tokens": len(per_token)}


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """tau^2 * mean_t KL(p_teacher || q_student): the student learns the teacher's soft targets."""
    return _scaled_mean(token_kl(teacher_logits.detach(), student_logits, temperature), temperature)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """tau^2 * mean_t KL(q_student || p_teacher): the student puts its mass where the teacher's is."""
    return _scaled_mean(token_kl(student_logits, teacher_logits.detach(), temperature), temperature)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}
