"""The one place that generates: batched sampling with a KV cache, and sequence log-probs.

Sampling, per batch of prompts:
    1. left-pad the prompts so every row ends at the same column; positions count real tokens only
    2. prefill once (one forward over the prompts), keeping only the last position's logits
    3. for N samples per prompt, repeat the prompt's cache N times instead of re-running the prefill
    4. decode: sample a token per row (temperature, top-p), feed it back with the cache, until
       every row has produced EOS (or one of `stop_ids`, e.g. a newline to generate one reasoning
       step at a time) or `max_new_tokens` tokens

Log-probs: log pi(y_t | x, y_<t) for the completion tokens of a teacher-forced batch.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from posttrain.data import encode_prompt
from posttrain.losses.sft import IGNORE


@dataclasses.dataclass
class Samples:
    """Completions in prompt-major order: row i*N + j is sample j of prompt i."""

    texts: list[str]
    token_ids: list[list[int]]  # completion tokens, EOS (or the stop token) included when the model stopped
    prompt_ids: list[list[int]]  # one entry per row (repeated for the N samples)
    stopped: list[bool]  # whether the row ended with EOS or a stop token rather than hitting max_new_tokens

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    stop_ids: tuple[int, ...] = (),
) -> Samples:
    """Sample `num_samples` completions for each prompt; see the module docstring.

    A row also stops after emitting any token in `stop_ids` (kept in its output, like EOS)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    generator = torch.Generator(device=_device(model)).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = Samples([], [], [], [])
    prompts_per_chunk = max(1, batch_size // num_samples)
    for start in range(0, len(encoded), prompts_per_chunk):
        chunk = encoded[start : start + prompts_per_chunk]
        ids, stopped = _generate_chunk(model, tokenizer, chunk, max_new_tokens, temperature, top_p, num_samples, generator,
                                       (tokenizer.eos_token_id, *stop_ids))
        out.token_ids += ids
        out.stopped += stopped
        out.prompt_ids += [p for p in chunk for _ in range(num_samples)]
    out.texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
    model.train(was_training)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _generate_chunk(model, tokenizer, prompts, max_new_tokens, temperature, top_p, num_samples, generator, stops):
    device, pad = _device(model), tokenizer.pad_token_id
    stop_set = torch.tensor(stops, device=device)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (P, W)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)  # filled in place by every forward below
    kw = {_cache_keyword(model): cache, "use_cache": True}
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **kw).logits[:, -1]
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits, mask = logits.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
    rows = logits.shape[0]
    next_pos = mask.sum(-1, keepdim=True)  # (R, 1): the position of the first new token
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        token = token.masked_fill(done, pad)  # finished rows emit padding
        new_tokens.append(token)
        done |= torch.isin(token, stop_set)
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, **kw).logits[:, -1]
        next_pos = next_pos + 1
    tokens = torch.stack(new_tokens, dim=1).tolist()  # (R, steps)
    ids, stopped = [], []
    for row in tokens:
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), None)
        ids.append(row[:cut])
        stopped.append(cut is not None)
    return ids, stopped


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t+1] | ..t) for each position, (B, T-1); 0 where the label is ignored.

    Uses log_softmax's identity log p_y = z_y - logsumexp(z), computed in float32.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * mask


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of completion-token log-probs per row, (B,): log pi(y | x)."""
    batch = {k: v.to(_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return token_logprobs(logits, batch["labels"]).sum(-1)
