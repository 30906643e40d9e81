"""The SFT loss: its value by hand, and the output layer run only where a label can follow."""
import math

import pytest
import torch

from posttrain.data import EncodedDataset, encode_pair
from posttrain.losses.sft import IGNORE, causal_lm_loss, labelled_positions, labelled_suffix, sft_loss
from tests.conftest import random_model


def test_sft_loss_by_hand():
    """Position 0 has logits (0, 0) and label 1: -log 1/2. Position 1 has (ln 3, 0) and label 0: -log 3/4.
    Position 2 predicts nothing. Mean over the two labelled tokens: ln(8/3) / 2."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    labels = torch.tensor([[IGNORE, 1, 0]])
    scored, targets, rows = labelled_positions(logits, labels)
    assert scored.shape == (2, 2) and targets.tolist() == [1, 0] and rows.tolist() == [0, 0]
    loss, metrics = sft_loss(scored, targets)
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2, abs=1e-6)
    assert metrics["tokens"] == 2


def test_labelled_suffix_by_hand():
    """The first label of any row sits in column 2 (second row), so positions 1.. (4 of 5) predict labels."""
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 5, 6], [IGNORE, IGNORE, 7, 8, IGNORE]])
    assert labelled_suffix(labels) == 4
    assert labelled_suffix(torch.full((2, 5), IGNORE)) == 1  # nothing to score: one column, an empty loss


def test_causal_lm_loss_equals_the_loss_over_every_position(tokenizer):
    """Keeping only the logits that can score a label changes neither the loss nor its gradients."""
    rows = [encode_pair(tokenizer, "Q: 12+34\n" * n, f"A: {46 * n}") for n in (2, 3, 5)]  # prompts of three lengths
    batch = EncodedDataset(rows, tokenizer.pad_token_id, 3, seed=0).batch(0)
    assert labelled_suffix(batch["labels"]) < batch["labels"].shape[1] - 10  # the shortest prompt is skipped
    model = random_model(tokenizer)
    loss, metrics = causal_lm_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    full, _ = sft_loss(*labelled_positions(logits, batch["labels"])[:2])
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    assert loss.item() == pytest.approx(full.item(), abs=1e-6)
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, full_grads))
    assert metrics["tokens"] == int((batch["labels"] != IGNORE).sum())
