"""Supervised fine-tuning losses.

Next-token cross-entropy averaged over the tokens that carry a label; prompt and padding tokens
carry the label -100 and so no loss. Shapes: logits (B, T, V), labels (B, T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (B, T-1): position t predicts labels[t+1]; ignored positions are 0."""
    shifted = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(shifted)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over labelled tokens: -1/N sum_t log p(y_t | y_<t, x)."""
    mask = labels[:, 1:] != IGNORE  # (B, T-1)
    n_tokens = mask.sum().clamp(min=1)
    loss = token_cross_entropy(logits, labels).sum() / n_tokens
    return loss, {"loss": loss.item(), "tokens": int(n_tokens)}


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Run `model` on a batch (input_ids, labels, optional attention_mask) and return `sft_loss`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return sft_loss(logits, batch["labels"])


def l2sp_penalty(model, anchors: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """L2-SP (Li et al. 2018, Eq. 3): strength/2 * sum_i ||w_i - w0_i||^2 over the anchored weights.

    Pulls fine-tuned weights toward the pretrained ones `anchors` (name -> tensor) instead of
    toward zero, the usual defence against catastrophic forgetting by regularisation.
    """
    params = {name.removeprefix("module."): p for name, p in model.named_parameters()}  # DDP's wrapper adds module.
    for name, w0 in anchors.items():
        if w0.device != params[name].device:  # anchors follow the model to its device, once
            anchors[name] = w0.to(params[name].device)
    total = sum(((params[name] - w0) ** 2).sum() for name, w0 in anchors.items())
    return 0.5 * strength * total
