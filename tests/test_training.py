"""The training loop: it learns, it resumes exactly, it stops cleanly on divergence and Ctrl-C."""
import json
import os
import signal

import pytest
import torch

import posttrain.training as training
from posttrain.data import EncodedDataset, encode_pair
from posttrain.errors import UserError
from posttrain.forward import causal_lm_loss
from posttrain.training import TrainingConfig, TrainingInterrupted, lr_lambda, train
from tests.conftest import random_model


def dataset(tokenizer, batch_size=8):
    rows = [encode_pair(tokenizer, f"Q: {a}+{b}\n", f"A: {a + b}") for a in range(6) for b in range(6)]
    return EncodedDataset(rows, tokenizer.pad_token_id, batch_size, seed=0)


def config(**kw):
    return TrainingConfig(**{"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "log_every": 5, **kw})


def test_loop_reduces_loss(tokenizer, tmp_path):
    model = random_model(tokenizer)
    result = train(model, dataset(tokenizer).batch, causal_lm_loss, config(steps=60), tmp_path)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(5, 61, 5))


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_gradient_accumulation_matches_one_big_batch(tokenizer, tmp_path, grad_accum):
    """The rows' answers have one or two digits, so micro-batches hold different numbers of labelled tokens:
    each is weighted by its share of the batch's tokens (a plain mean of the micro-batches' means would
    weigh a token of a micro-batch with fewer of them more, and end elsewhere)."""
    data = dataset(tokenizer)
    a, b = random_model(tokenizer), random_model(tokenizer)
    one = train(a, data.batch, causal_lm_loss, config(steps=3, log_every=1), tmp_path / "a")
    split = train(b, data.batch, causal_lm_loss, config(steps=3, log_every=1, grad_accum=grad_accum), tmp_path / "b")
    assert [h["loss"] for h in split.history] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    assert [h["tokens"] for h in split.history] == [h["tokens"] for h in one.history]  # a count: summed
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=2e-5)


def test_micro_batches_are_weighted_by_what_the_loss_averages_over(tokenizer, tmp_path):
    """Two micro-batches of 3 and 1 labelled tokens whose mean losses are 1 and 5: the step's loss is the
    mean over the 4 tokens, (3 x 1 + 1 x 5) / 4 = 2, not the mean of the means, 3."""
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, 1, 1, 1], [-100, 1, -100, -100]])}
    weight = torch.nn.Parameter(torch.zeros(()))

    def loss_fn(model, micro):
        value = weight + (1.0 if len(micro["labels"]) and micro["labels"][0, 2] == 1 else 5.0)
        return value, {"loss": value.item()}

    accelerator = training.make_accelerator("fp32")
    optimizer = torch.optim.SGD([weight], lr=0.0)
    metrics = training._optimizer_step(torch.nn.Linear(1, 1), optimizer, batch, loss_fn,
                                       TrainingConfig(batch_size=2, grad_accum=2, max_grad_norm=0), accelerator)
    assert metrics["loss"] == pytest.approx(2.0)


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(TrainingConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1))
    assert [round(f(s), 3) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)


def test_interrupted_and_resumed_run_equals_uninterrupted(tokenizer, tmp_path, monkeypatch):
    data = dataset(tokenizer)
    straight = random_model(tokenizer)
    full = train(straight, data.batch, causal_lm_loss, config(), tmp_path / "straight")

    real_step, calls = training._optimizer_step, {"n": 0}

    def interrupt_at_step_13(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(training, "_optimizer_step", interrupt_at_step_13)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(random_model(tokenizer), data.batch, causal_lm_loss, config(), tmp_path / "resumed")
    monkeypatch.setattr(training, "_optimizer_step", real_step)
    assert json.loads((tmp_path / "resumed/checkpoint/state.json").read_text())["step"] == 12

    resumed = random_model(tokenizer, seed=99)  # a fresh process: weights come from the checkpoint
    end = train(resumed, data.batch, causal_lm_loss, config(), tmp_path / "resumed", resume=True)
    assert end.final_metrics["loss"] == pytest.approx(full.final_metrics["loss"], abs=1e-6)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 12, 15, 20, 25, 30]  # the checkpoint's last step logged, no step logged twice


@pytest.mark.parametrize("when", ["in the step, after its update", "in the evaluation after the step"])
def test_ctrl_c_after_a_steps_update_counts_that_step(tokenizer, tmp_path, monkeypatch, when):
    """SIGINT arriving once step 13 has updated the weights: the checkpoint says 13 steps, and the resumed run
    ends where an uninterrupted one does (a checkpoint saying 12 would apply step 13 twice). Under torchrun a
    rank is interrupted wherever it happens to be, the evaluation between steps included."""
    data = dataset(tokenizer)
    straight = random_model(tokenizer)
    full = train(straight, data.batch, causal_lm_loss, config(), tmp_path / "straight")
    real_step, calls = training._optimizer_step, {"n": 0}

    def sigint_after_update_13(*args, **kw):
        metrics = real_step(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 13:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    def sigint_in_evaluation(step):
        if step == 13:
            os.kill(os.getpid(), signal.SIGINT)
        return {}

    inside = when.startswith("in the step")
    if inside:
        monkeypatch.setattr(training, "_optimizer_step", sigint_after_update_13)
    with pytest.raises(TrainingInterrupted, match="after step 13"):
        train(random_model(tokenizer), data.batch, causal_lm_loss, config(), tmp_path / "resumed",
              eval_fn=None if inside else sigint_in_evaluation, eval_every=1)
    monkeypatch.setattr(training, "_optimizer_step", real_step)
    assert json.loads((tmp_path / "resumed/checkpoint/state.json").read_text())["step"] == 13

    resumed = random_model(tokenizer, seed=99)
    end = train(resumed, data.batch, causal_lm_loss, config(), tmp_path / "resumed", resume=True)
    assert end.final_metrics["loss"] == pytest.approx(full.final_metrics["loss"], abs=1e-6)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tokenizer, tmp_path):
    data = dataset(tokenizer)

    def loss_nan_after_10(model, batch, calls={"n": 0}):
        calls["n"] += 1
        loss, metrics = causal_lm_loss(model, batch)
        if calls["n"] > 10:
            loss = loss * float("nan")
            metrics["loss"] = float("nan")
        return loss, metrics

    with pytest.raises(UserError, match="diverged.*step 11.*last good checkpoint"):
        train(random_model(tokenizer), data.batch, loss_nan_after_10, config(checkpoint_every=5), tmp_path)
    assert json.loads((tmp_path / "checkpoint/state.json").read_text())["step"] == 10


def test_resume_without_checkpoint_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train(random_model(tokenizer), dataset(tokenizer).batch, causal_lm_loss, config(), tmp_path, resume=True)


def test_forward_as_swaps_the_forward_for_the_block_only():
    layer = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    eager = layer(x)
    with training.forward_as(layer, lambda inputs: torch.zeros(1, 2)):
        assert torch.equal(layer(x), torch.zeros(1, 2))
    assert torch.equal(layer(x), eager) and "forward" not in vars(layer)
    with training.forward_as(layer, None):  # nothing to swap in: the eager forward
        assert torch.equal(layer(x), eager)


@pytest.mark.slow
def test_compiled_training_steps_match_eager(tokenizer, tmp_path):
    """compile=true runs the same steps (torch.compile of the forward; ~30 s of compiling on a CPU)."""
    eager, compiled = random_model(tokenizer), random_model(tokenizer)
    a = train(eager, dataset(tokenizer).batch, causal_lm_loss, config(steps=4, log_every=1), tmp_path / "a")
    b = train(compiled, dataset(tokenizer).batch, causal_lm_loss, config(steps=4, log_every=1, compile=True),
              tmp_path / "b")
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-4)
    assert "forward" not in vars(compiled)  # evaluation after training runs eager


def test_a_batch_too_small_to_split_is_one_clear_error(tokenizer, tmp_path):
    data = dataset(tokenizer, batch_size=1)  # one row a step, but two micro-batches asked for
    with pytest.raises(UserError, match="batch of 1 rows cannot give each of 1 process.*2 micro-batch"):
        train(random_model(tokenizer), data.batch, causal_lm_loss, config(batch_size=2, grad_accum=2), tmp_path)
