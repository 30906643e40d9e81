"""The sampler and log-probs against hand computations on a tiny random model."""
import pytest
import torch

from posttrain.data import encode_pair, pad_batch
from posttrain.errors import UserError
from posttrain.generation import _decode, generate, inverse_cdf_sample, sample_next, sequence_logprobs, token_logprobs
from posttrain.losses.sft import IGNORE
from tests.conftest import random_model


def test_token_logprobs_equal_a_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]])  # (1, 3, 3)
    labels = torch.tensor([[IGNORE, 2, 0]])
    got = token_logprobs(logits, labels)
    # position 0 predicts label 2: log softmax([1,2,3])[2] = 3 - log(e + e^2 + e^3)
    # position 1 predicts label 0: 0.5 - log(2 e^0.5 + 1)
    e = torch.exp
    want = torch.tensor([[3 - torch.log(e(torch.tensor(1.0)) + e(torch.tensor(2.0)) + e(torch.tensor(3.0))),
                          0.5 - torch.log(2 * e(torch.tensor(0.5)) + 1)]])
    assert torch.allclose(got, want, atol=1e-6)


def test_sequence_logprobs_sum_only_completion_tokens(tokenizer):
    """Two rows whose completions start at different columns (the first is scored from a later column)."""
    model = random_model(tokenizer)
    rows = [encode_pair(tokenizer, "Q: 1+2\nA: 3\nQ: 12+34\n", "A: 46"), encode_pair(tokenizer, "Q: 12+34\n", "A: 46")]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
        want = []
        for ids, labels in rows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            want.append(sum(logp[t - 1, ids[t]] for t in range(labels.count(IGNORE), len(ids))))
    assert torch.allclose(got, torch.stack(want), atol=1e-5)


def greedy_without_cache(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    out = []
    for _ in range(n):
        token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(token)
        if token == tokenizer.eos_token_id:
            break
    return out


def test_cached_batched_greedy_equals_uncached_reference(tokenizer):
    model = random_model(tokenizer, seed=3)
    prompts = ["Q: 1+2\n", "Q: reverse 3 1 4 1 5\n", "Q: 347+285\n"]  # different lengths: left padding
    with torch.no_grad():
        samples = generate(model, tokenizer, prompts, max_new_tokens=12)
        for prompt, got in zip(prompts, samples.token_ids):
            assert got == greedy_without_cache(model, tokenizer, prompt, 12)


def test_shared_prefill_samples_are_reproducible_and_diverse(tokenizer):
    model = random_model(tokenizer, seed=4)
    a = generate(model, tokenizer, ["Q: 12+34\n"], num_samples=8, temperature=1.0, max_new_tokens=10, seed=7)
    b = generate(model, tokenizer, ["Q: 12+34\n"], num_samples=8, temperature=1.0, max_new_tokens=10, seed=7)
    assert a.token_ids == b.token_ids and len(a.texts) == 8
    assert len({tuple(t) for t in a.token_ids}) > 1
    greedy = generate(model, tokenizer, ["Q: 12+34\n"], num_samples=3, max_new_tokens=10)
    assert greedy.token_ids[0] == greedy.token_ids[1] == greedy.token_ids[2]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    picks = {int(sample_next(logits, 1.0, 0.8, torch.tensor([[u / 200]]))) for u in range(200)}
    assert picks == {0, 1}  # 0.6 < 0.8 so the second token joins; the tail never does
    assert int(sample_next(logits, 0.0, 1.0, None)) == 0


def test_inverse_cdf_sampling_draws_each_token_with_its_probability():
    """100,000 draws of each row: every frequency within 0.006 of its probability (four standard
    errors at p = 0.5: sqrt(0.25 / 1e5) = 0.0016), and a weight of 0 never drawn, first, inside or last."""
    weights = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0],
                            [0.0, 0.1, 0.0, 0.0, 0.9],
                            [0.0, 0.0, 0.0, 0.0, 2.0]])  # unnormalised: sampling divides by the sum
    rows = weights.repeat_interleave(100_000, dim=0)
    uniform = torch.rand(len(rows), 1, generator=torch.Generator().manual_seed(0))
    picks = inverse_cdf_sample(rows, uniform).view(3, -1)
    for row, drawn in zip(weights, picks):
        frequency = torch.bincount(drawn, minlength=5).float() / drawn.numel()
        assert torch.allclose(frequency, row / row.sum(), atol=0.006)
        assert (frequency[row == 0] == 0).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_stop_sampling_with_a_clear_error(tokenizer, temperature):
    model = random_model(tokenizer, seed=5)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every logit NaN, as after a diverged update
    with pytest.raises(UserError, match="NaN or infinite in 2 of 2 rows"):
        generate(model, tokenizer, ["Q: 1+2\n", "Q: 3+4\n"], temperature=temperature, max_new_tokens=4)


def test_a_minus_infinite_logit_is_a_token_never_drawn_not_an_error():
    logits = torch.tensor([[0.0, float("-inf"), 0.0]]).repeat(4, 1)  # a model that rules token 1 out
    tokens = _decode(lambda token, position: logits, logits, torch.zeros(4, 1, dtype=torch.long), 20, 1.0, 1.0,
                     torch.Generator().manual_seed(0), torch.tensor([99]), 0, 1)
    assert tokens.shape == (4, 20) and not (tokens == 1).any() and set(tokens.unique().tolist()) == {0, 2}


class ScriptedDecoder:
    """Stands in for a model: row r may emit tokens 0-2 (uniformly) for its first 2r steps, then only
    the stop token 3. Records how many rows each step was given."""

    def __init__(self, rows: int):
        self.rows, self.step, self.batch_sizes = torch.arange(rows), 0, []

    def logits(self) -> torch.Tensor:
        stopping = (self.step >= 2 * self.rows)[:, None]
        return torch.where(stopping, torch.tensor([-1e9, -1e9, -1e9, 0.0]), torch.tensor([0.0, 0.0, 0.0, -1e9]))

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        assert len(token) == len(self.rows) == len(position)
        self.step += 1
        self.batch_sizes.append(len(token))
        return self.logits()


class ShrinkingDecoder(ScriptedDecoder):
    def keep_rows(self, index: torch.Tensor) -> None:
        self.rows = self.rows[index]


def test_finished_rows_leave_the_batch_and_every_row_keeps_its_tokens():
    """Rows that stop at steps 0, 2, ..., 14: a decoder that can drop rows gets fewer and fewer of them,
    and every row's tokens equal those of a decoder that keeps the whole batch (same seed)."""
    def decode(decoder):
        return _decode(decoder, decoder.logits(), torch.zeros(8, 1, dtype=torch.long), 30, 1.0, 1.0,
                       torch.Generator().manual_seed(0), torch.tensor([3]), 9, 1)

    whole, shrinking = ScriptedDecoder(8), ShrinkingDecoder(8)
    want, got = decode(whole), decode(shrinking)
    assert torch.equal(got, want) and got.shape == (8, 15)
    for r, row in enumerate(got.tolist()):
        assert set(row[: 2 * r]) <= {0, 1, 2} and row[2 * r] == 3 and set(row[2 * r + 1 :]) <= {9}
    assert whole.batch_sizes == [8] * 14
    # row r is unfinished for 2r + 1 steps; a batch shrinks once at most 3/4 of it is unfinished
    assert shrinking.batch_sizes == sorted(shrinking.batch_sizes, reverse=True) and shrinking.batch_sizes[-1] == 1
    assert sum(shrinking.batch_sizes) < 0.7 * sum(whole.batch_sizes)


def test_rows_leaving_the_dynamic_cache_change_no_samples(tokenizer, monkeypatch):
    """Half the vocabulary stops a row, so rows finish at different steps and leave the dynamic cache;
    the static cache keeps every row: the same samples."""
    from posttrain.generation import DynamicDecoder
    kept = []
    keep_rows = DynamicDecoder.keep_rows
    monkeypatch.setattr(DynamicDecoder, "keep_rows", lambda self, index: kept.append(len(index)) or keep_rows(self, index))
    model = random_model(tokenizer, seed=4)
    kwargs = dict(num_samples=8, temperature=1.0, max_new_tokens=16, seed=3, stop_ids=tuple(range(0, len(tokenizer), 2)))
    dynamic = generate(model, tokenizer, ["Q: 12+34\n", "Q: reverse 3 1 4\n"], **kwargs)
    static = generate(model, tokenizer, ["Q: 12+34\n", "Q: reverse 3 1 4\n"], decode="static", **kwargs)
    assert kept and dynamic.token_ids == static.token_ids and dynamic.stopped == static.stopped
    assert len({len(ids) for ids in dynamic.token_ids}) > 2


def test_static_cache_decoding_equals_uncached_reference(tokenizer):
    """decode="static" (preallocated cache, what "compiled" compiles) decodes exactly as the reference,
    also on a second chunk of the same shape, which reuses the decoder and its cache."""
    model = random_model(tokenizer, seed=3)
    first = ["Q: 1+2\n", "Q: reverse 3 1 4 1 5\n", "Q: 347+285\n"]
    second = ["Q: 9-4\n", "Q: sort 5 2 8\n", "Q: 12+34\n"]
    with torch.no_grad():
        for prompts in (first, second):
            samples = generate(model, tokenizer, prompts, max_new_tokens=12, decode="static")
            for prompt, got in zip(prompts, samples.token_ids):
                assert got == greedy_without_cache(model, tokenizer, prompt, 12)
    assert len(model._posttrain_decoders) == 1


def test_static_cache_samples_equal_the_dynamic_caches(tokenizer):
    model = random_model(tokenizer, seed=4)
    kwargs = dict(num_samples=4, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    dynamic = generate(model, tokenizer, ["Q: 12+34\n", "Q: 5+6\n"], **kwargs)
    static = generate(model, tokenizer, ["Q: 12+34\n", "Q: 5+6\n"], decode="static", **kwargs)
    assert static.token_ids == dynamic.token_ids and static.stopped == dynamic.stopped
    assert len({tuple(t) for t in static.token_ids}) > 1


@pytest.mark.slow
def test_compiled_decoding_equals_the_dynamic_cache(tokenizer):
    """decode="compiled" (torch.compile of the static-cache step; ~20 s of compiling on a CPU)."""
    model = random_model(tokenizer, seed=5)
    prompts = ["Q: 1+2\n", "Q: reverse 3 1 4 1 5\n", "Q: 347+285\n"]
    for kwargs in (dict(), dict(num_samples=2, temperature=1.0, seed=3)):
        want = generate(model, tokenizer, prompts, max_new_tokens=12, **kwargs)
        got = generate(model, tokenizer, prompts, max_new_tokens=12, decode="compiled", **kwargs)
        assert got.token_ids == want.token_ids


def test_a_described_generation_shows_its_progress_and_a_plain_one_is_silent(tokenizer, capsys):
    model = random_model(tokenizer)
    prompts = ["Q: 12+34\n", "Q: 5+6\n", "Q: 7+8\n"]
    plain = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert capsys.readouterr().err == ""
    shown = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, desc="greedy answers to 3")
    err = capsys.readouterr().err
    assert "greedy answers to 3" in err and "/10 " in err  # two chunks (batch 2) of 5 decoding steps each
    assert shown.texts == plain.texts
