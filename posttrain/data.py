"""Records to tensors: prompt/completion pairs become token ids with a loss mask.

    input_ids  [ prompt tokens ........ | completion tokens ... EOS | pad pad ]
    labels     [ -100 ................. | completion tokens ... EOS | -100 ... ]

Only completion tokens and the end-of-sequence token carry loss, so the model learns to answer
and to stop, not to reproduce the question. With a chat model (its tokenizer has a chat template)
the prompt is rendered as a user turn with the template's generation prompt.

A row longer than the model's context (or `max_length`) would train with only a transformers warning,
on positions the model has no embedding for; `encode_rows` cuts such a row's completion at the limit
(the prompt is what the model conditions on: it is kept whole), drops a row whose prompt alone fills
the limit, and counts both, or refuses the first long row with `truncation=error`.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

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


TRUNCATION = ("truncate", "error")  # what `encode_rows` does with a row over the limit
MANY_ROWS = 2000  # encoding more rows than this shows a progress bar


@dataclasses.dataclass(frozen=True)
class RowLimit:
    """The longest row a run trains on, in tokens (None: no limit), and what happens to a longer one."""

    max_length: int | None
    truncation: str = "truncate"  # one of TRUNCATION

    @classmethod
    def of(cls, cfg, model) -> RowLimit:
        """`cfg.max_length`, else (0) the model's context, `config.max_position_embeddings`."""
        return cls(cfg.max_length or getattr(model.config, "max_position_embeddings", None), cfg.truncation)


@dataclasses.dataclass
class EncodedRows:
    """`encode_rows`'s result: the rows, which pair each came from, and how many were cut or dropped."""

    rows: list[tuple[list[int], list[int]]]
    kept: list[int]  # rows[j] encodes pairs[kept[j]]
    truncated: int  # rows whose completion was cut at the limit
    dropped: int  # pairs whose prompt alone fills the limit: no row

    @property
    def counts(self) -> dict:
        """For a summary's metrics."""
        return {"truncated_rows": self.truncated, "dropped_rows": self.dropped}


def encode_rows(tokenizer, pairs: list, limit: RowLimit | None = None) -> EncodedRows:
    """`encode_pair` of every (prompt, completion) pair, each row at most `limit.max_length` tokens.

    A longer row keeps its whole prompt and the start of its completion (its end-of-sequence token goes with
    the end); one whose prompt alone is that long is dropped; one line says how many. With
    `truncation="error"` the first longer row is a `UserError` naming its index and length instead."""
    max_length = limit.max_length if limit else None
    rows, kept, truncated, dropped = [], [], 0, 0
    for i, (prompt, completion) in enumerate(tqdm(pairs, desc="tokenizing", disable=len(pairs) <= MANY_ROWS)):
        ids, labels = encode_pair(tokenizer, prompt, completion)
        if max_length is not None and len(ids) > max_length:
            if limit.truncation == "error":
                raise UserError(f"training row {i} (counted from 0; prompt {str(prompt)[:40]!r}...) is {len(ids)} "
                                f"tokens, over max_length={max_length}; shorten it, raise max_length, or set "
                                "truncation=truncate to cut such rows")
            if labels[max_length - 1] == IGNORE:  # the prompt fills the limit: no completion token would be left
                dropped += 1
                continue
            ids, labels, truncated = ids[:max_length], labels[:max_length], truncated + 1
        rows.append((ids, labels))
        kept.append(i)
    _report_cut(truncated, dropped, len(pairs), max_length)
    return EncodedRows(rows, kept, truncated, dropped)


def _report_cut(truncated: int, dropped: int, total: int, max_length: int | None) -> None:
    if truncated or dropped:
        print(f"posttrain: of {total} training rows, {truncated} longer than max_length={max_length} tokens had "
              f"their completion cut and {dropped} whose prompt alone is that long were dropped "
              "(truncation=error refuses them instead)", flush=True)
    if total and dropped == total:
        raise UserError(f"every training row's prompt is at least max_length={max_length} tokens long; "
                        "raise max_length (at most the model's context) or shorten the prompts")


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
