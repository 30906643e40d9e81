"""Supervised fine-tuning losses.

Next-token cross-entropy averaged over the tokens that carry a label; prompt and padding tokens
carry the label -100 (`IGNORE`) and so no loss. The loss reads the logits of the N positions whose
next token carries a label, (N, V), and their labels, (N,); `posttrain.forward` runs the model to
produce them (packed, or chunked when they pass the model's budget).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the N labelled positions: -1/N sum_t log p(y_t | y_<t, x).

    logits (N, V) at the positions that predict a label, scored in float32; targets (N,) those labels."""
    n_tokens = max(len(targets), 1)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / n_tokens
    return loss, {"loss": loss.item(), "tokens": len(targets)}


def labelled_token_count(batch: dict) -> int:
    """What a token-mean loss averages over: the positions whose next token carries a label."""
    return int((batch["labels"][..., 1:] != IGNORE).sum())


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
