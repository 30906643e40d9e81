"""Supervised fine-tuning losses.

Next-token cross-entropy averaged over the tokens that carry a label; prompt and padding tokens
carry the label -100 and so no loss. Shapes: a batch's input_ids and labels (B, T); the loss reads the
logits of the N positions whose next token carries a label, (N, V).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from posttrain import packing

IGNORE = -100


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the N labelled positions: -1/N sum_t log p(y_t | y_<t, x).

    logits (N, V) at the positions that predict a label, scored in float32; targets (N,) those labels."""
    n_tokens = max(len(targets), 1)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / n_tokens
    return loss, {"loss": loss.item(), "tokens": len(targets)}


def labelled_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions of full-layout logits (B, T, V) whose next token carries a label, in row-major order:
    (logits (N, V), targets (N,), rows (N,)); position t scores labels[:, t + 1]."""
    mask = labels[:, 1:] != IGNORE  # (B, T-1)
    return logits[:, :-1][mask], labels[:, 1:][mask], mask.nonzero()[:, 0]


def labelled_suffix(labels: torch.Tensor) -> int:
    """How many final positions of the batch can predict a labelled token: T - j, where column j is the
    first (over all rows) whose next token carries a label. Logits before it score nothing."""
    labelled_columns = (labels[:, 1:] != IGNORE).any(0).nonzero()  # (columns, 1)
    first = int(labelled_columns[0]) if len(labelled_columns) else labels.shape[1] - 1
    return labels.shape[1] - first


class Labelled(NamedTuple):
    """What the model computes at the N positions of a batch whose next token carries a label, row by row."""

    logits: torch.Tensor  # (N, V)
    targets: torch.Tensor  # (N,): the labels those positions predict
    rows: torch.Tensor  # (N,): the batch row of each
    hidden: torch.Tensor | None  # (N, H): the last hidden state there (what a value head reads), when asked


def labelled_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V), targets (N,), rows (N,)) at the N positions of the batch whose next token carries a
    label, row by row (`labelled_forward`)."""
    logits, targets, rows, _ = labelled_forward(model, batch)
    return logits, targets, rows


def labelled_forward(model, batch: dict, hidden: bool = False) -> Labelled:
    """The model's outputs at the N positions of the batch whose next token carries a label; with `hidden`,
    also the last hidden states there. The output layer runs only there. A model `packing.enable`d runs a
    padded batch packed (no layer computes on padding); otherwise on the last K = `labelled_suffix` columns
    (`logits_to_keep`), so prompts that precede every row's completion cost no vocabulary-sized logits."""
    mask = batch.get("attention_mask")
    if packing.enabled(model) and packing.has_padding(batch) and packing.is_right_padded(mask):
        return packed_labelled_forward(model, batch, hidden)
    keep = labelled_suffix(batch["labels"])
    labels = batch["labels"][:, -keep:]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=keep,
                output_hidden_states=hidden)  # logits (B, K, V)
    states = labelled_positions(out.hidden_states[-1][:, -keep:], labels)[0] if hidden else None
    return Labelled(*labelled_positions(out.logits, labels), states)


def packed_labelled_forward(model, batch: dict, hidden: bool = False) -> Labelled:
    """`labelled_forward` of a right-padded batch run packed: one row of its real tokens (`packing.pack`)."""
    packed = packing.pack(batch)
    # position t scores labels[t + 1], unless t + 1 starts the next sequence
    scores = (packed.labels[1:] != IGNORE) & ~packed.sequence_starts()[1:]  # (N-1,)
    keep = scores.nonzero().squeeze(1)
    with packing.packed_attention(model):
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, logits_to_keep=keep,
                    packed=packed.layout, output_hidden_states=hidden)
    states = out.hidden_states[-1][0, keep] if hidden else None
    return Labelled(out.logits[0], packed.labels[keep + 1], packed.layout.rows[keep], states)  # logits (N_labelled, V)


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Run `model` on a batch (input_ids, labels, optional attention_mask) and return `sft_loss`."""
    logits, targets, _ = labelled_logits(model, batch)
    return sft_loss(logits, targets)


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
