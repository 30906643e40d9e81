"""The one place that generates: batched sampling with a KV cache, and sequence log-probs.

Sampling, per batch of prompts:
    1. left-pad the prompts so every row ends at the same column; positions count real tokens only
    2. prefill once (one forward over the prompts), keeping only the last position's logits
    3. for N samples per prompt, repeat the prompt's cache N times instead of re-running the prefill
    4. decode: sample a token per row (temperature, top-p), feed it back with the cache, until
       every row has produced EOS (or one of `stop_ids`, e.g. a newline to generate one reasoning
       step at a time) or `max_new_tokens` tokens; once at most 3/4 of the rows are unfinished, the
       finished ones leave the batch and its cache (dynamic cache only: a static one keeps its shape)

By default the decoding cache grows by one column a step, written in place into room reserved after
the prefill (`GrowingLayer`; transformers' DynamicCache copies the whole cache with torch.cat at
every token instead, which slows long rollouts on the CPU; docs/PERFORMANCE.md). `decode="compiled"`
preallocates the whole chunk's cache (StaticCache) so that every step has the same shapes, and runs
the step through torch.compile: on a GPU one CUDA graph replay per token (`StaticDecoder`). All of
them give the same tokens for the same seed.

Log-probs: log pi(y_t | x, y_<t) for the completion tokens of a teacher-forced batch.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from posttrain.data import encode_prompt
from posttrain.errors import UserError
from posttrain.forward import chunk_rows, chunked_entropy, chunked_losses, labelled_forward, output_weight
from posttrain.losses.ppo import token_entropy
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


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor | None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else nucleus sampling with the
    row's uniform random number in [0, 1) (B, 1)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return inverse_cdf_sample(probs, uniform)


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative weights (B, V), index i with probability p_i / sum(p), given
    one uniform random number u in [0, 1) per row (B, 1).

    Inverse transform sampling: with the row's cumulative distribution F (F_{V-1} = 1), u picks the
    first i with F_i > u, which happens with probability F_i - F_{i-1} = p_i. A token of weight 0 has
    F_i = F_{i-1} and so is never the first to exceed u. One random number per row, where
    torch.multinomial draws one per vocabulary entry: on the CPU at 64 x 384 it took 1,062 us a step
    against 68 us (docs/PERFORMANCE.md).
    """
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end, so u < 1 always finds an index
    # a row of NaN weights finds none: keep the index a valid token (`generate` reports such rows)
    return torch.searchsorted(cdf, uniform, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


DECODES = ("dynamic", "static", "compiled")
WIDTH_MULTIPLE = 64  # static caches round the prompt width up to this
SHRINK_AT = 0.75  # the dynamic cache drops finished rows once at most this share of its batch is unfinished


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
    decode: str = "dynamic",
    desc: str | None = None,
) -> Samples:
    """Sample `num_samples` completions for each prompt; see the module docstring.

    A row also stops after emitting any token in `stop_ids` (kept in its output, like EOS).
    `decode` picks the KV cache of the decoding steps: "dynamic" grows by one column a step (the
    default); "static" is preallocated for the whole chunk (`StaticDecoder`); "compiled" is static
    with the step run by torch.compile, as one CUDA graph on a GPU (each new shape compiles once).
    With a `desc`, a progress bar of decoding steps (max_new_tokens per chunk of prompts) says how far it is."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got '{decode}'")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    generator = torch.Generator(device=_device(model)).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = Samples([], [], [], [])
    prompts_per_chunk = max(1, batch_size // num_samples)
    starts = range(0, len(encoded), prompts_per_chunk)
    bar = tqdm(total=len(starts) * max_new_tokens, desc=desc, unit="step", disable=desc is None, leave=False,
               dynamic_ncols=True)
    for k, start in enumerate(starts):
        chunk = encoded[start : start + prompts_per_chunk]
        ids, stopped = _generate_chunk(model, tokenizer, chunk, max_new_tokens, temperature, top_p, num_samples, generator,
                                       (tokenizer.eos_token_id, *stop_ids), decode, bar.update)
        bar.update((k + 1) * max_new_tokens - bar.n)  # a chunk whose rows all stopped early ends its share
        out.token_ids += ids
        out.stopped += stopped
        out.prompt_ids += [p for p in chunk for _ in range(num_samples)]
    bar.close()
    out.texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
    model.train(was_training)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _generate_chunk(model, tokenizer, prompts, max_new_tokens, temperature, top_p, num_samples, generator, stops, decode,
                    on_step=lambda n: None):
    device, pad = _device(model), tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    if decode != "dynamic":  # fewer distinct cache shapes, so fewer compiles
        width = -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (P, W)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prefill = DynamicCache(config=model.config)  # filled in place by the forward
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                   **{_cache_keyword(model): prefill, "use_cache": True}).logits[:, -1]
    logits, mask = logits.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)  # (R, .)
    if decode == "dynamic":
        step = DynamicDecoder(model, reserve_room(prefill, num_samples, width + max_new_tokens), mask, max_new_tokens)
    else:
        step = static_decoder(model, mask.shape[0], width + max_new_tokens, compiled=decode == "compiled")
        step.start(prefill, num_samples, mask)
    # Reading `done` on the host waits for the GPU to finish; on a GPU look every 16 steps, not every step
    # (rows that are done emit padding meanwhile).
    check_every = 16 if device.type == "cuda" else 1
    tokens = _decode(step, logits, mask.sum(-1, keepdim=True), max_new_tokens, temperature, top_p, generator,
                     torch.tensor(stops, device=device), pad, check_every, on_step).tolist()  # (R, steps)
    ids, stopped = [], []
    for row in tokens:
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), None)
        ids.append(row[:cut])
        stopped.append(cut is not None)
    return ids, stopped


def _decode(step, logits, next_pos, max_new_tokens, temperature, top_p, generator, stop_set, pad, check_every,
            on_step=lambda n: None):
    """Sample a token per row, feed it back through `step(token, position) -> logits`, repeat; (R, steps).
    `on_step(1)` after each step (a progress bar's update).

    A decoder that can drop rows (`keep_rows(index)`, the dynamic cache's) is given only the unfinished
    ones once at most SHRINK_AT of its batch is unfinished: the steps left then cost what those rows
    need, not what the whole batch does (in a GRPO batch of 64 rollouts most can stop within a few
    tokens while one runs ten times longer). Every step draws one uniform per row of the whole batch
    and a row keeps its own, so dropping rows changes no row's tokens.
    """
    rows, device = logits.shape[0], logits.device
    tokens = torch.full((rows, max_new_tokens), pad, device=device)  # finished rows: padding
    live = torch.arange(rows, device=device)  # the output row of each row still decoding
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    diverged = torch.zeros_like(done)  # rows with no valid next-token distribution, read once at the end
    keep_rows = getattr(step, "keep_rows", None)
    for i in range(max_new_tokens):
        # a row's largest logit is NaN if any logit is, +inf if one is, -inf if all are (one reduction a step;
        # a -inf among finite logits is a token of probability 0, which samples fine)
        diverged[live] |= ~torch.isfinite(logits.amax(-1))
        uniform = torch.rand(rows, 1, generator=generator, device=device)[live] if temperature > 0 else None
        token = sample_next(logits, temperature, top_p, uniform).masked_fill(done, pad)
        tokens[live, i] = token
        done |= torch.isin(token, stop_set)
        on_step(1)
        if i + 1 == max_new_tokens:
            break
        if (i + 1) % check_every == 0:  # reading `done` on the host waits for the device
            unfinished = (~done).nonzero().squeeze(-1)
            if len(unfinished) == 0:
                break
            if keep_rows and len(unfinished) <= SHRINK_AT * len(done):
                keep_rows(unfinished)
                live, done, token, next_pos = live[unfinished], done[unfinished], token[unfinished], next_pos[unfinished]
        logits = step(token[:, None], next_pos + i)
    if diverged.any():
        raise UserError(f"the model's next-token logits were NaN or infinite in {int(diverged.sum())} of "
                        f"{len(diverged)} rows while sampling: its weights have diverged (lower the learning "
                        "rate) or the model folder holds broken weights")
    return tokens[:, : i + 1]


class GrowingLayer(DynamicLayer):
    """transformers' DynamicLayer with its columns reserved up front: an update writes the new keys and
    values into the reserved tensors (B, heads, capacity, head dim), and `keys`/`values` are views of
    the columns written so far. DynamicLayer's torch.cat copies the whole cache at every token instead,
    a cost that grows with the length: 256-token rollouts of the tiny model, batch 64, took 3.5-4.3 s
    with it and 2.2-3.0 s without on a CPU."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.room = {"keys": keys.new_empty(*keys.shape[:2], capacity, keys.shape[3]),
                     "values": values.new_empty(*values.shape[:2], capacity, values.shape[3])}
        self.device, self.is_initialized = keys.device, True
        self._write(keys, values, 0)

    def _write(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        end = start + keys.shape[2]
        self.room["keys"][:, :, start:end] = keys
        self.room["values"][:, :, start:end] = values
        self.keys, self.values = self.room["keys"][:, :, :end], self.room["values"][:, :, :end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._write(key_states, value_states, self.keys.shape[2])
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (a copy of those rows' reserved columns)."""
        columns = self.keys.shape[2]
        self.room = {name: room[indices] for name, room in self.room.items()}
        self.keys, self.values = self.room["keys"][:, :, :columns], self.room["values"][:, :, :columns]


def repeated(layer, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill layer's keys and values with each row repeated for its `repeats` samples."""
    return layer.keys.repeat_interleave(repeats, 0), layer.values.repeat_interleave(repeats, 0)


def reserve_room(prefill: DynamicCache, repeats: int, capacity: int) -> DynamicCache:
    """The prompts' cache with each row repeated for its samples and every full-attention layer a
    GrowingLayer of `capacity` columns (other kinds of layers, e.g. sliding-window ones, keep theirs)."""
    for index, layer in enumerate(prefill.layers):
        if type(layer) is DynamicLayer:
            prefill.layers[index] = GrowingLayer(*repeated(layer, repeats), capacity)
        else:
            layer.batch_repeat_interleave(repeats)
    return prefill


class DynamicDecoder:
    """Decoding steps on a cache as long as the tokens so far (`reserve_room`): one new column a step,
    and the padding mask (R, W + new tokens) read as a view of its first columns."""

    def __init__(self, model, cache: DynamicCache, prompt_mask: torch.Tensor, max_new_tokens: int):
        self.model, self.cache = model, cache
        self.mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], max_new_tokens)], dim=-1)
        self.kwargs = {_cache_keyword(model): cache, "use_cache": True}

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """(R, 1) tokens at (R, 1) positions -> next-token logits (R, V)."""
        mask = self.mask[:, : self.cache.get_seq_length() + 1]  # the cached columns and this token's
        return self.model(input_ids=token, attention_mask=mask, position_ids=position, **self.kwargs).logits[:, -1]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Decode only the rows `index` from now on (finished rows leave the batch)."""
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]


class StaticDecoder:
    """Decoding steps on a preallocated cache of R rows x L columns (transformers' StaticCache).

    Every step has the same shapes (token (R, 1), mask (R, L), cache (R, heads, L, head dim)): the
    key and value of column c are written in place, and the causal mask hides the columns not yet
    written. Fixed shapes let torch.compile trace the step once; with mode="reduce-overhead" a GPU
    then replays it as one CUDA graph, one launch per token instead of one per kernel (a small
    model's decode step is launch overhead, not arithmetic). The decoder lives as long as the model
    and is reused by every chunk of the same shape (`static_decoder`).
    """

    def __init__(self, model, rows: int, length: int, compiled: bool):
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise UserError(f"decode=static and decode=compiled need full-attention layers; "
                            f"{type(model).__name__} has sliding-window ones: use decode=dynamic")
        self.mask = torch.ones(rows, length, dtype=torch.long, device=_device(model))
        torch._dynamo.mark_static_address(self.mask)  # refilled in place for every chunk, never copied into a graph
        self.kwargs = {_cache_keyword(model): self.cache, "use_cache": True}
        self.compiled = compiled
        self.forward = torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if compiled else self._forward

    def _forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=token, attention_mask=self.mask, position_ids=position, **self.kwargs).logits[:, -1]

    def start(self, prefill: DynamicCache, repeats: int, prompt_mask: torch.Tensor) -> None:
        """Copy the prompts' keys and values (P rows, W columns), each repeated for its `repeats` samples,
        into columns 0..W-1; the mask is the prompts' (R, W) padding mask, then ones."""
        self.cache.reset()
        for index, layer in enumerate(prefill.layers):
            self.cache.update(*repeated(layer, repeats), index)
        self.mask[:, : prompt_mask.shape[1]].copy_(prompt_mask)
        self.mask[:, prompt_mask.shape[1] :].fill_(1)

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """(R, 1) tokens at (R, 1) positions -> next-token logits (R, V)."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits may be overwritten now
        return self.forward(token, position)


def static_decoder(model, rows: int, length: int, compiled: bool) -> StaticDecoder:
    """The model's decoder for this shape, built on first use (a compiled one compiles on its first step)."""
    decoders = model.__dict__.setdefault("_posttrain_decoders", {})
    weight = next(model.parameters())
    key = (rows, length, compiled, weight.device, weight.dtype)  # a model moved or cast gets new caches
    if key not in decoders:
        decoders[key] = StaticDecoder(model, rows, length, compiled)
    return decoders[key]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t+1] | ..t) for each position, (B, T-1); 0 where the label is ignored.

    Uses log_softmax's identity log p_y = z_y - logsumexp(z), computed in float32.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * mask


class TokenScores(NamedTuple):
    """A model's scores of the N labelled tokens of a batch, row by row."""

    logp: torch.Tensor  # (N,): log p of each labelled token
    entropy: torch.Tensor | None  # (N,): entropy of the distribution it was drawn from, without gradient
    rows: torch.Tensor  # (N,): its batch row
    hidden: torch.Tensor | None  # (N, H): the last hidden state there (PPO's value head reads it)


def labelled_token_logprobs(model, batch: dict, with_entropy: bool = False, with_hidden: bool = False) -> TokenScores:
    """`TokenScores` of the batch's labelled tokens, entropy and hidden states only when asked. Logits only
    where a label follows, packed if `packing.enable`d (`labelled_forward`), and a chunk of rows at a time
    past the model's logits budget (`ChunkedCrossEntropy`)."""
    chunk = chunk_rows(model, batch)
    if not chunk:
        logits, targets, rows, hidden = labelled_forward(model, batch, hidden=with_hidden)  # logits (N, V)
        entropy = token_entropy(logits.detach()) if with_entropy else None
        return TokenScores(target_logprobs(logits, targets), entropy, rows, hidden)
    losses, rows, hidden = chunked_losses(model, batch, chunk)  # (N,), (N,), (N, H)
    entropy = chunked_entropy(hidden.detach(), output_weight(model), chunk) if with_entropy else None
    return TokenScores(-losses, entropy, rows, hidden if with_hidden else None)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under each row of logits: (N, V), (N,) -> (N,), in float32."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of completion-token log-probs per row, (B,): log pi(y | x)."""
    batch = {k: v.to(_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    logp, _, rows, _ = labelled_token_logprobs(model, batch)
    return logp.new_zeros(len(batch["input_ids"])).index_add(0, rows, logp)
