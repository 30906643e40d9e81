"""Teacher-forced forward passes: logits only where a label follows, packed or chunked.

A loss on a labelled batch (SFT, distillation, the log-probabilities of DPO, GRPO and PPO) reads the
model's outputs only at the N positions whose next token carries a label (labels are -100,
`losses.sft.IGNORE`, on prompts and padding). This module runs the model so that it computes no more
than that, and hands the pure losses of `posttrain.losses` tensors of shape (N, V) or (N,):

- `labelled_forward` runs the output layer only at those positions: a model `packing.enable`d runs a
  right-padded batch packed into one row (no layer computes on padding, shared prompts once);
  otherwise it keeps the last `labelled_suffix` columns (`logits_to_keep`), so prompts that precede
  every completion cost no vocabulary-sized logits.
- Those logits can outgrow the model itself: N positions of a V-word vocabulary are 4·N·V bytes in
  float32 (16k tokens of a 151k-word vocabulary are 10 GB), before their gradient. Beyond a budget
  written onto the model (`budget_logits`, 1 GB by default), `causal_lm_loss` and
  `generation.labelled_token_logprobs` never hold them all: `ChunkedCrossEntropy` builds them from
  the last hidden states a chunk of rows at a time and builds each chunk again in the backward pass,
  trading one more output-layer product for the memory.

It lives in core, beside `packing`, because it runs models; `posttrain.losses` stays pure functions of
tensors that this module and the methods feed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from posttrain import packing
from posttrain.losses.ppo import token_entropy
from posttrain.losses.sft import IGNORE, labelled_token_count, sft_loss


def labelled_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions of full-layout logits (B, T, V) whose next token carries a label, in row-major order:
    (logits (N, V), targets (N,), rows (N,)); position t scores labels[:, t + 1]."""
    mask = labels[:, 1:] != IGNORE  # (B, T-1)
    return logits[:, :-1][mask], labels[:, 1:][mask], mask.nonzero()[:, 0]


def labelled_suffix(labels: torch.Tensor) -> int:
    """How many final positions of the batch can predict a labelled token: T - j, where column j is the
    first (over all rows) whose next token carries a label. Logits before it score nothing."""
    labelled_columns = (labels[:, 1:] != IGNORE).any(0).nonzero()  # (columns, 1)
    first = int(labelled_columns[0]) if len(labelled_columns) else labels.shape[1] - 1
    return labels.shape[1] - first


class Labelled(NamedTuple):
    """What the model computes at the N positions of a batch whose next token carries a label, row by row."""

    logits: torch.Tensor  # (N, V)
    targets: torch.Tensor  # (N,): the labels those positions predict
    rows: torch.Tensor  # (N,): the batch row of each
    hidden: torch.Tensor | None  # (N, H): the last hidden state there (what a value head reads), when asked


def labelled_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V), targets (N,), rows (N,)) at the N positions of the batch whose next token carries a
    label, row by row (`labelled_forward`)."""
    logits, targets, rows, _ = labelled_forward(model, batch)
    return logits, targets, rows


def labelled_forward(model, batch: dict, hidden: bool = False, logits: bool = True) -> Labelled:
    """The model's outputs at the N positions of the batch whose next token carries a label; with `hidden`,
    also the last hidden states there; with `logits=False`, no logits at all (None: the output layer runs
    on no position). The output layer runs only there. A model `packing.enable`d runs a padded batch
    packed (no layer computes on padding); otherwise on the last K = `labelled_suffix` columns
    (`logits_to_keep`), so prompts that precede every row's completion cost no vocabulary-sized logits."""
    mask = batch.get("attention_mask")
    if packing.enabled(model) and packing.has_padding(batch) and packing.is_right_padded(mask):
        return packed_labelled_forward(model, batch, hidden, logits)
    keep = labelled_suffix(batch["labels"])
    labels = batch["labels"][:, -keep:]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=hidden,
                logits_to_keep=keep if logits else no_positions(labels))  # logits (B, K, V)
    states, targets, rows = labelled_positions(out.hidden_states[-1][:, -keep:], labels) if hidden else (None,) * 3
    if logits:
        selected, targets, rows = labelled_positions(out.logits, labels)
    return Labelled(selected if logits else None, targets, rows, states)


def packed_labelled_forward(model, batch: dict, hidden: bool = False, logits: bool = True) -> Labelled:
    """`labelled_forward` of a right-padded batch run packed: one row of its real tokens, shared prefixes once
    (`packing.pack`)."""
    packed = packing.pack(batch)
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    rows, columns = ((labels[:, 1:] != IGNORE) & mask[:, 1:]).nonzero().unbind(1)  # each position before a label
    keep = packed.position_of(rows, columns)  # (N,), in row-major order; a shared position can appear twice
    with packing.packed_attention(model):
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, packed=packed.layout,
                    logits_to_keep=keep if logits else keep[:0], output_hidden_states=hidden)
    states = out.hidden_states[-1][0, keep] if hidden else None
    selected = out.logits[0] if logits else None  # (N, V)
    return Labelled(selected, labels[rows, columns + 1], rows, states)


def no_positions(like: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` that keeps no position: an empty index."""
    return torch.empty(0, dtype=torch.long, device=like.device)


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Run `model` on a batch (input_ids, labels, optional attention_mask) and return `sft_loss`; when its
    logits would pass the model's budget (`budget_logits`), the same loss chunk by chunk."""
    rows = chunk_rows(model, batch)
    if not rows:
        logits, targets, _ = labelled_logits(model, batch)
        return sft_loss(logits, targets)
    losses, _, _ = chunked_losses(model, batch, rows)
    loss = losses.sum() / max(len(losses), 1)
    return loss, {"loss": loss.item(), "tokens": len(losses)}


def chunked_losses(model, batch: dict, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy (N,), batch row (N,), last hidden state (N, H)) at the N labelled positions, their
    logits built `rows` at a time from the hidden states (`ChunkedCrossEntropy`), never all at once."""
    _, targets, batch_rows, hidden = labelled_forward(model, batch, hidden=True, logits=False)
    return ChunkedCrossEntropy.apply(hidden, output_weight(model), targets, rows), batch_rows, hidden


def output_weight(model) -> torch.Tensor:
    """The output layer's weight (V, H), which `ChunkedCrossEntropy` multiplies the hidden states by."""
    return packing.unwrapped(model).get_output_embeddings().weight


DEFAULT_LOGITS_MB = 1024.0


def budget_logits(model, megabytes: float) -> None:
    """Let `causal_lm_loss` and `generation.labelled_token_logprobs` hold at most `megabytes` of `model`'s
    float32 logits at once (0: no limit)."""
    packing.unwrapped(model)._posttrain_logits_mb = megabytes


def chunk_rows(model, batch: dict) -> int:
    """Rows of logits per chunk for the batch's labelled positions, or 0 to build them all at once: when
    they fit the model's budget, or when its logits are not its output layer applied to its last hidden
    state (a bias, a scale or a soft cap after it), which the chunked loss would leave out."""
    model = packing.unwrapped(model)
    megabytes = getattr(model, "_posttrain_logits_mb", DEFAULT_LOGITS_MB)
    rows = max(1, int(megabytes * 2**20) // (4 * model.config.vocab_size))
    n_labelled = labelled_token_count(batch)
    if not megabytes or n_labelled <= rows or not logits_from_last_hidden(model):
        return 0
    return rows


def logits_from_last_hidden(model) -> bool:
    """Whether logits == output layer (a bias-free nn.Linear) of hidden_states[-1], checked once per model on
    a short sequence (relative gap <= 1e-4 in float32, 2e-2 in half precision)."""
    if not hasattr(model, "_posttrain_plain_head"):
        head = model.get_output_embeddings()
        model._posttrain_plain_head = (isinstance(head, torch.nn.Linear) and head.bias is None
                                       and head_gap(model, head) <= packing.rounding_tolerance(head.weight.dtype))
    return model._posttrain_plain_head


@torch.no_grad()
def head_gap(model, head) -> float:
    """Max |logits - head(last hidden state)| / max |logits| on one sequence of 5 tokens."""
    was_training = model.training
    model.eval()
    ids = torch.arange(5, device=head.weight.device).unsqueeze(0) % model.config.vocab_size
    out = model(input_ids=ids, output_hidden_states=True)
    model.train(was_training)
    return ((out.logits - head(out.hidden_states[-1])).abs().max() / out.logits.abs().max().clamp(min=1e-6)).item()


class ChunkedCrossEntropy(torch.autograd.Function):
    """-log softmax(h_i W^T)[y_i] for each of N rows, (N,), holding at most `rows` rows of logits (rows, V) at once.

        forward:   for each chunk c:  z_c = h_c W^T (float32);  loss_c = logsumexp(z_c) - z_c[y_c]
        backward:  z_c again;  dz_c = g_c * (softmax(z_c) - onehot(y_c));  dh_c = dz_c W,  dW += dz_c^T h_c

    with g the incoming gradient of each row's loss. Nothing of size N x V is kept between the passes,
    only h (N, H). Under autocast the products run in its precision in both passes (custom_fwd /
    custom_bwd), as the unchunked loss's output layer does.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, rows: int):
        losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), rows):
            chunk = slice(start, start + rows)
            logits = (hidden[chunk] @ weight.T).float()  # (rows, V)
            losses[chunk] = logits.logsumexp(-1) - logits.gather(1, targets[chunk, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.rows = rows
        return losses

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_losses):
        hidden, weight, targets = ctx.saved_tensors
        train_weight = ctx.needs_input_grad[1]  # not when the output layer is frozen (LoRA)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if train_weight else None
        for start in range(0, len(targets), ctx.rows):
            chunk = slice(start, start + ctx.rows)
            h = hidden[chunk]
            grad_logits = (h @ weight.T).float()  # (rows, V), turned into softmax in place: no second copy
            grad_logits.sub_(grad_logits.logsumexp(-1, keepdim=True)).exp_()
            grad_logits[torch.arange(len(h), device=h.device), targets[chunk]] -= 1
            grad_logits *= grad_losses[chunk, None]
            grad_hidden[chunk] = grad_logits.to(weight.dtype) @ weight
            if train_weight:
                grad_weight += grad_logits.T @ h.to(grad_logits.dtype)
        return grad_hidden, grad_weight.to(weight.dtype) if train_weight else None, None, None


@torch.no_grad()
def chunked_entropy(hidden: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Entropy of softmax(h_i W^T) for each of N rows, (N,), `rows` rows of logits at a time (no gradient)."""
    parts = [token_entropy(hidden[start : start + rows] @ weight.T) for start in range(0, len(hidden), rows)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
