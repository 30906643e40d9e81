"""KL divergence between the policy and the reference, estimated from the policy's own samples.

For a token y sampled from pi, with log-ratio  r = log ref(y) - log pi(y)  (Schulman, "Approximating
KL divergence", 2020):

    k1 = -r                      unbiased for KL(pi || ref), high variance, can be negative
    k2 = r^2 / 2                 biased, low variance, always >= 0
    k3 = (e^r - 1) - r           unbiased, low variance, always >= 0 (GRPO, Eq. 4 of DeepSeekMath)

PPO's KL penalty uses k1 per token; GRPO's loss uses k3. `exact_kl` needs no sample: it sums over
the whole vocabulary, which is cheap for small vocabularies and is what runs report as `kl`.
"""
from __future__ import annotations

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log pi(y) - log ref(y), elementwise (any shape)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(log pi(y) - log ref(y))^2 / 2, elementwise."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(r) - r - 1 with r = log ref(y) - log pi(y), elementwise."""
    r = ref_logp - logp
    return torch.expm1(r) - r  # expm1 keeps precision when r is near 0, the usual case


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi(.|ctx) || ref(.|ctx)) per position, summed over the vocabulary: (B, T, V) -> (B, T)."""
    logp = logits.float().log_softmax(-1)
    ref_logp = ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)
