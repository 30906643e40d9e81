"""Records to tensors: the loss mask covers the completion and EOS, never the prompt or padding."""
from posttrain.data import EncodedDataset, encode_pair, pad_batch
from posttrain.losses.sft import IGNORE


def test_prompt_tokens_carry_no_loss_and_eos_does(tokenizer):
    ids, labels = encode_pair(tokenizer, "Q: 12+34\n", "A: 46")
    n_prompt = len(tokenizer("Q: 12+34\n")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == "A: 46"


def test_padding_is_masked_out(tokenizer):
    rows = [encode_pair(tokenizer, "Q: 1+2\n", "A: 3"), encode_pair(tokenizer, "Q: 12+34\n", "A: 46")]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    short = len(rows[0][0])
    assert batch["attention_mask"][0, short:].sum() == 0 and batch["attention_mask"][0, :short].all()
    assert (batch["labels"][0, short:] == IGNORE).all()
    left = pad_batch(rows, tokenizer.pad_token_id, side="left")
    assert left["input_ids"][0, -short:].tolist() == rows[0][0]


def test_batches_are_a_pure_function_of_the_step(tokenizer):
    rows = [encode_pair(tokenizer, f"Q: {i}+1\n", f"A: {i + 1}") for i in range(10)]
    a, b = EncodedDataset(rows, 0, 4, seed=1), EncodedDataset(rows, 0, 4, seed=1)
    assert all((a.batch(s)["input_ids"] == b.batch(s)["input_ids"]).all() for s in range(6))
    # an epoch (2 batches of 4 from 10 rows) never repeats a row
    first_epoch = [tuple(r.tolist()) for s in range(2) for r in a.batch(s)["input_ids"]]
    assert len(set(first_epoch)) == 8
