"""Padding-free (packed) batches: the layout by hand, and the same losses, gradients and log-probs as padded."""
import pytest
import torch
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from posttrain import packing
from posttrain.data import EncodedDataset, encode_pair, pad_batch
from posttrain.forward import budget_logits, causal_lm_loss
from posttrain.generation import sequence_logprobs
from posttrain.losses.sft import IGNORE
from tests.conftest import random_model


def test_pack_by_hand():
    """Rows of 3, 1 and 2 real tokens in a 3 x 3 grid: their tokens end to end, positions from 0 in each."""
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0], [9, 4, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])}
    packed = packing.pack(batch)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.layout.slots.tolist() == [0, 1, 2, 3, 6, 7]
    assert packed.layout.sources.tolist() == [0, 1, 2, 3, 6, 6, 4, 5, 6]  # 6 = N: padding
    grid = packing.to_grid(torch.arange(6.0).view(1, 1, 6, 1), packed.layout)  # (B, H, W, D) = (3, 1, 3, 1)
    assert grid.flatten().tolist() == [0, 1, 2, 3, 0, 0, 4, 5, 0]


def test_rows_that_start_like_the_row_above_share_those_tokens():
    """[5 6 7 8], [5 6 9], [5 6 9 4], [3 5]: the second row shares 5 6 with the first, the third 5 6 9 with
    the second (its 5 6 being the first row's); only the tokens after a shared prefix are packed."""
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 6, 9, 4], [3, 5, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])}
    assert packing.shared_prefix_lengths(batch["input_ids"], batch["attention_mask"].bool()).tolist() == [0, 2, 3, 0]
    packed = packing.pack(batch)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 0, 1]]
    assert packed.layout.sources.view(4, 4).tolist() == [[0, 1, 2, 3], [0, 1, 4, 8], [0, 1, 4, 5], [6, 7, 8, 8]]
    assert packed.position_of(torch.tensor([2, 2, 3]), torch.tensor([1, 3, 0])).tolist() == [1, 5, 6]


def test_right_padding_is_recognised():
    assert packing.is_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not packing.is_right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left-padded: trained padded


def batch_of_mixed_lengths(tokenizer, rows: int = 4) -> dict:
    """Prompts and completions of different lengths, so that the padded batch is mostly padding in places."""
    pairs = [encode_pair(tokenizer, "Q: 12+34\n" * (1 + i % 3), "A: 46" * (1 + i)) for i in range(rows)]
    return EncodedDataset(pairs, tokenizer.pad_token_id, rows, seed=0).batch(0)


def gpt2_model(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the two steps compared draw no dropout
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return GPT2LMHeadModel(config)


def grouped_query_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("build", [random_model, gpt2_model, grouped_query_llama], ids=["llama", "gpt2", "llama-gqa"])
def test_packed_training_step_equals_the_padded_one(tokenizer, build, monkeypatch):
    """Rotary (Llama) and learned (GPT-2) positions, grouped-query attention: same loss and every gradient."""
    calls = []
    monkeypatch.setitem(AttentionInterface._global_mapping, packing.NAME,
                        lambda *args, **kwargs: calls.append(1) or packing.attention(*args, **kwargs))
    batch = batch_of_mixed_lengths(tokenizer)
    assert not batch["attention_mask"].all()
    model = build(tokenizer).train()
    padded, metrics = causal_lm_loss(model, batch)
    padded_grads = torch.autograd.grad(padded, list(model.parameters()))
    assert packing.enable(model)
    calls.clear()
    loss, packed_metrics = causal_lm_loss(model, batch)
    assert len(calls) == 2  # the packed attention ran, once per layer
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == pytest.approx(padded.item(), abs=1e-6) and packed_metrics["tokens"] == metrics["tokens"]
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, padded_grads))
    assert model.config._attn_implementation != packing.NAME  # restored after each packed call


@pytest.mark.parametrize("build", [random_model, gpt2_model], ids=["llama", "gpt2"])
def test_shared_prefixes_give_the_padded_log_probs_and_gradients(tokenizer, build):
    """DPO-like rows: two completions of one prompt that agree up to a digit, a third that is the prompt
    and a prefix of theirs, and another prompt. Computing the shared prefixes once gives each row's
    summed log-probs and every gradient of the padded batch."""
    rows = [encode_pair(tokenizer, "Q: 12+34\n", "1+3=4\n2+4=6\nA: 46"),
            encode_pair(tokenizer, "Q: 12+34\n", "1+3=4\n2+4=7\nA: 47"),
            encode_pair(tokenizer, "Q: 12+34\n", "1+3=4"),
            encode_pair(tokenizer, "Q: 9-4\n", "A: 5")]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    assert len(packing.pack(batch).input_ids[0]) < 0.7 * batch["attention_mask"].sum()
    model = build(tokenizer).train()
    padded = sequence_logprobs(model, batch)
    padded_grads = torch.autograd.grad(padded @ torch.tensor([1.0, -1.0, 0.5, 2.0]), list(model.parameters()))
    assert packing.enable(model)
    shared = sequence_logprobs(model, batch)
    grads = torch.autograd.grad(shared @ torch.tensor([1.0, -1.0, 0.5, 2.0]), list(model.parameters()))
    assert torch.allclose(shared, padded, atol=1e-5)
    assert all(torch.allclose(g, h, atol=1e-5) for g, h in zip(grads, padded_grads))


def test_packed_sequence_logprobs_equal_the_padded_ones(tokenizer):
    """DPO's per-row sums, rows in their batch order; built two rows of logits at a time as well, with the
    same gradients."""
    batch = batch_of_mixed_lengths(tokenizer, rows=5)
    model = random_model(tokenizer)
    with torch.no_grad():
        padded = sequence_logprobs(model, batch)
    assert packing.enable(model)
    packed = sequence_logprobs(model, batch)
    want_grads = torch.autograd.grad((packed * torch.arange(1.0, 6.0)).sum(), list(model.parameters()))
    budget_logits(model, 2 * 4 * model.config.vocab_size / 2**20)
    chunked = sequence_logprobs(model, batch)
    grads = torch.autograd.grad((chunked * torch.arange(1.0, 6.0)).sum(), list(model.parameters()))
    assert torch.allclose(packed, padded, atol=1e-5) and torch.allclose(chunked, packed, atol=1e-5)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(grads, want_grads))


def test_a_model_whose_attention_ignores_the_layout_trains_padded(tokenizer, monkeypatch, capsys):
    """If packed sequences could see each other, `enable` finds the logits changed and refuses."""
    def across_sequences(module, query, key, value, attention_mask, packed=None, **kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        return out.transpose(1, 2), None

    monkeypatch.setitem(AttentionInterface._global_mapping, packing.NAME, across_sequences)
    model = random_model(tokenizer)
    assert not packing.enable(model) and not packing.enabled(model)
    assert "training on padded batches" in capsys.readouterr().err


def test_rollout_logprobs_and_entropy_equal_the_full_computation_packed_or_not(tokenizer):
    """GRPO's update: per-token log-probs and entropies on the (N, T-1) grid, 0 where no completion token follows."""
    from posttrain.generation import token_logprobs
    from posttrain.losses.ppo import token_entropy
    from posttrain.rollouts import forward_logprobs

    batch = batch_of_mixed_lengths(tokenizer, rows=5)
    model = random_model(tokenizer)
    scored = batch["labels"][:, 1:] != IGNORE
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, T, V)
        want_logp, want_entropy = token_logprobs(logits, batch["labels"]), token_entropy(logits[:, :-1]) * scored
        for packed, chunked in ((False, False), (True, False), (True, True)):
            if packed:
                assert packing.enable(model)
            if chunked:  # logits two rows at a time (`ChunkedCrossEntropy`, `chunked_entropy`)
                budget_logits(model, 2 * 4 * model.config.vocab_size / 2**20)
            assert forward_logprobs(model, batch)[1] is None  # the entropy only when asked for
            logp, entropy = forward_logprobs(model, batch, with_entropy=True)
            assert torch.allclose(logp, want_logp, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-5)


def test_ppo_values_logprobs_and_entropies_equal_the_full_computation_packed_or_not(tokenizer):
    """PPO's forward: the value head on the last hidden state, log-probs and entropies, on the (N, T-1) grid at
    completion positions (0 elsewhere), with the same gradient reaching the value head; padded, packed, and
    with the logits two rows at a time; the entropies with a gradient only when an entropy bonus needs it."""
    from posttrain.generation import token_logprobs
    from posttrain.losses.ppo import token_entropy
    from posttrain.methods.rl.ppo import ValueHead, forward_with_values

    batch = batch_of_mixed_lengths(tokenizer, rows=5)
    model = random_model(tokenizer)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, generator=torch.Generator().manual_seed(0))  # not 0, as it starts
    scored = batch["labels"][:, 1:] != IGNORE
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    want = (token_logprobs(out.logits, batch["labels"]), head(out.hidden_states[-1][:, :-1]) * scored,
            token_entropy(out.logits[:, :-1]) * scored)
    want_grad = torch.autograd.grad(want[1].sum(), head.linear.weight)[0]
    for packed, chunked in ((False, False), (True, False), (True, True)):
        if packed:
            assert packing.enable(model)
        if chunked:  # logits two rows at a time, except for an entropy bonus's gradient
            budget_logits(model, 2 * 4 * model.config.vocab_size / 2**20)
        for entropy_grad in (False, True):
            got = forward_with_values(model, head, batch, entropy_grad=entropy_grad)
            assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
            assert got[2].requires_grad == entropy_grad
            assert torch.allclose(torch.autograd.grad(got[1].sum(), head.linear.weight)[0], want_grad, atol=1e-4)


def test_train_packs_by_default_and_not_with_packing_false(tokenizer, tmp_path):
    from posttrain.training import TrainingConfig, train

    data = EncodedDataset([encode_pair(tokenizer, "Q: 1+2\n" * (1 + i % 3), "A: 3") for i in range(8)],
                          tokenizer.pad_token_id, 4, seed=0)
    for pack, folder in ((True, "packed"), (False, "padded")):
        model = random_model(tokenizer)
        train(model, data.batch, causal_lm_loss, TrainingConfig(steps=2, batch_size=4, packing=pack), tmp_path / folder)
        assert packing.enabled(model) == pack
