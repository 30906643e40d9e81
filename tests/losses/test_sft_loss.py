"""The SFT loss: its value by hand, the output layer run only where a label can follow, and in chunks."""
import math

import pytest
import torch

from posttrain.data import EncodedDataset, encode_pair
from transformers import LlamaForCausalLM

from posttrain import packing
from posttrain.forward import (ChunkedCrossEntropy, budget_logits, causal_lm_loss, chunk_rows, labelled_positions,
                               labelled_suffix)
from posttrain.losses.sft import IGNORE, sft_loss
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


@pytest.mark.parametrize("rows", [1, 3, 10])
def test_chunked_cross_entropy_equals_the_full_one(rows):
    """Per-row cross-entropy of 10 rows and its gradients for the hidden states and the output weight, with
    chunks of 1, 3 (the last one short) and all 10 rows, against autograd through the full logits; each row's
    loss weighted differently, so every row's upstream gradient counts."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=generator, requires_grad=True)
    weight = torch.randn(7, 6, generator=generator, requires_grad=True)
    targets = torch.randint(0, 7, (10,), generator=generator)
    weights = torch.linspace(-1.0, 2.0, 10)
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    chunked = ChunkedCrossEntropy.apply(hidden, weight, targets, rows)
    assert torch.allclose(chunked, full, atol=1e-6)
    want = torch.autograd.grad((weights * full).sum(), (hidden, weight))
    got = torch.autograd.grad((weights * chunked).sum(), (hidden, weight))
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    frozen = ChunkedCrossEntropy.apply(hidden, weight.detach(), targets, rows)  # a frozen output layer (LoRA)
    assert torch.allclose(torch.autograd.grad((weights * frozen).sum(), hidden)[0], want[0], atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_causal_lm_loss_over_its_logits_budget_is_the_same_loss_in_chunks(tokenizer, packed):
    """A budget of 3 rows of logits: same loss and every gradient as with the logits built at once."""
    rows = [encode_pair(tokenizer, "Q: 12+34\n" * n, f"A: {46 * n}") for n in (2, 3, 5)]
    batch = EncodedDataset(rows, tokenizer.pad_token_id, 3, seed=0).batch(0)
    chunked, whole = random_model(tokenizer), random_model(tokenizer)
    if packed:
        assert packing.enable(chunked) and packing.enable(whole)
    budget_logits(chunked, 3 * 4 * chunked.config.vocab_size / 2**20)  # 3 rows of float32 logits
    n_labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert chunk_rows(chunked, batch) == 3 and chunk_rows(whole, batch) == 0
    (loss, metrics), (want, _) = causal_lm_loss(chunked, batch), causal_lm_loss(whole, batch)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6) and metrics["tokens"] == n_labelled
    grads = torch.autograd.grad(loss, list(chunked.parameters()))
    want_grads = torch.autograd.grad(want, list(whole.parameters()))
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(grads, want_grads))


def test_logits_changed_after_the_output_layer_are_never_chunked(tokenizer):
    """A model that scales its logits after the output layer: the chunked loss would miss the scale, so the
    loss builds them at once whatever the budget."""

    class ScaledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2 * out.logits
            return out

    plain = random_model(tokenizer)
    scaled = ScaledLogits(plain.config)
    for model in (plain, scaled):
        budget_logits(model, 1e-6)  # less than one row: chunks of one row
    hundred_labels = {"labels": torch.zeros(1, 101, dtype=torch.long)}  # 100 positions predict a label
    assert chunk_rows(plain, hundred_labels) == 1 and chunk_rows(scaled, hundred_labels) == 0


def test_a_negative_logits_budget_is_refused_with_the_key_named():
    from posttrain.config import load_config
    from posttrain.errors import UserError
    from posttrain.training import TrainingConfig

    assert load_config(TrainingConfig, overrides=["loss_logits_mb=0"]).loss_logits_mb == 0  # 0: no limit
    with pytest.raises(UserError, match="'loss_logits_mb' must be >= 0"):
        load_config(TrainingConfig, overrides=["loss_logits_mb=-1"])
