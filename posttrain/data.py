"""Records to tensors: prompt/completion pairs become token ids with a loss mask.

    input_ids  [ prompt tokens ........ | completion tokens ... EOS | pad pad ]
    labels     [ -100 ................. | completion tokens ... EOS | -100 ... ]

Only completion tokens and the end-of-sequence token carry loss, so the model learns to answer
and to stop, not to reproduce the question. With a chat model (its tokenizer has a chat template)
the prompt is rendered as a user turn with the template's generation prompt.
"""
from __future__ import annotations

import torch

from posttrain.errors import UserError
from posttrain.losses.sft import IGNORE


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt, the same ids the sampler continues from.

    `prompt` is a string, or a sequence of (role, content) chat turns (needs a chat template).
    A string is used as raw text unless the tokenizer has a chat template, which then renders it
    as one user turn followed by the template's generation prompt.
    """
    if isinstance(prompt, str) and not has_chat_template(tokenizer):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not has_chat_template(tokenizer):
        raise UserError("chat-format data (message lists) needs a model whose tokenizer has a chat template: "
                        "give --model a chat model, or write the prompts as strings")
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [
        {"role": role, "content": content} for role, content in prompt]
    return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode_pair(tokenizer, prompt, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example; labels are -100 on the prompt (see encode_prompt)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, side: str = "right") -> dict:
    """Stack (input_ids, labels) rows into tensors of shape (B, T_max) with an attention mask."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        span = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids)
        labels[i, span] = torch.tensor(labs)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class EncodedDataset:
    """Encoded examples and a deterministic batch for every step (a pure function of seed and step)."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, seed: int):
        if not rows:
            raise ValueError("no training examples")
        self.rows, self.pad_id, self.batch_size, self.seed = rows, pad_id, batch_size, seed

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int) -> dict:
        """The padded rows `picks(step)`."""
        return pad_batch([self.rows[i] for i in self.picks(step)], self.pad_id)

    def picks(self, step: int) -> list[int]:
        """Indices of step's rows in an epoch-wise shuffle: every example once per epoch, epoch order seeded."""
        per_epoch = max(1, len(self.rows) // self.batch_size)
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        picks = order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        if len(picks) < self.batch_size:  # fewer rows than one batch: wrap around
            picks = (order.tolist() * (self.batch_size // len(self.rows) + 1))[: self.batch_size]
        return picks

    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.rows)
