"""Supervised fine-tuning losses.

Next-token cross-entropy averaged over the tokens that carry a label; prompt and padding tokens
carry the label -100 and so no loss. Shapes: logits (B, T, V), labels (B, T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over labelled tokens: -1/N sum_t log p(y_t | y_<t, x).

    Only the N labelled positions' logits are cast to float32 and scored: (N, V), not (B, T, V).
    """
    mask = labels[:, 1:] != IGNORE  # (B, T-1)
    n_tokens = mask.sum().clamp(min=1)
    picked = logits[:, :-1][mask].float()  # (N, V): the positions that predict a label
    loss = F.cross_entropy(picked, labels[:, 1:][mask], reduction="sum") / n_tokens
    return loss, {"loss": loss.item(), "tokens": int(n_tokens)}


def labelled_suffix(labels: torch.Tensor) -> int:
    """How many final positions of the batch can predict a labelled token: T - j, where column j is the
    first (over all rows) whose next token carries a label. Logits before it score nothing."""
    labelled_columns = (labels[:, 1:] != IGNORE).any(0).nonzero()  # (columns, 1)
    first = int(labelled_columns[0]) if len(labelled_columns) else labels.shape[1] - 1
    return labels.shape[1] - first


def labelled_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, V), labels (B, K)) of the last K = `labelled_suffix` positions, aligned as the full
    ones are (position t scores labels[t + 1]). The output layer runs only there (`logits_to_keep`):
    prompts that precede every row's completion cost no vocabulary-sized logits."""
    keep = labelled_suffix(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), logits_to_keep=keep).logits
    return logits, batch["labels"][:, -keep:]


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Run `model` on a batch (input_ids, labels, optional attention_mask) and return `sft_loss`."""
    return sft_loss(*labelled_logits(model, batch))


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
