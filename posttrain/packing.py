"""Padding-free training: the rows of a padded batch laid end to end, so no layer computes on padding,
and a row's leading tokens that equal the row above's computed once.

    padded (B, W), right-padded       packed (1, N): the N real tokens, row after row
    [a a a a . .]                     input_ids     [a a a a b b b b b b c c c]
    [b b b b b b]                     position_ids  [0 1 2 3 0 1 2 3 4 5 0 1 2]   (each sequence from 0)
    [c c c . . .]                     slots         [0 1 2 3 6 7 8 9 10 11 12 13 14]  (index in the B x W grid)

Every layer of a decoder except attention works token by token (embeddings, norms, projections,
MLPs, the output layer), so on the packed row it does the work of the N real tokens instead of the
B x W grid: with sequences of mixed lengths, half the grid can be padding. Attention must not cross
from one sequence into the next. `attention` puts each layer's queries, keys and values back into
the grid (cell by cell, `sources`: the packed token in each cell, a zero for padding), runs causal
scaled-dot-product attention per row there, and takes each real token's output back out of its cell
(`slots`): the attention of the padded batch, where only real tokens start rows and pads only follow
them, so causality alone keeps them out. (Flash-attention's variable-length kernels do the same
without the grid; this is the portable version, CPU included.)

Shared prefixes. In a causal model a token's hidden states depend only on it and the tokens before
it, so two rows that start with the same k tokens compute the same states there. DPO's chosen and
rejected completions of a prompt share the prompt and the reasoning up to the first step where they
differ; GRPO's completions of one prompt sit next to each other and share the prompt. A row's first
k tokens equal to the row above's are not packed again: their cells in the grid name the row above's
tokens, so attention reads them in both rows, and the gradients of both rows add up in the one copy
(the backward of a gather is a sum; with dropout, both rows see the one copy's mask). A labelled
token whose position is shared is scored from the shared position (`Packed.position_of`). With
4-digit CoT addition pairs, a misread digit in the rejected one, 21% of a DPO batch's tokens are
such shared prefixes.

The model runs packed while `packed_attention(model)` is active: its config names this attention
(registered with transformers' `AttentionInterface`), and `position_ids` restart at every sequence,
which is what rotary or learned position embeddings need. `enable(model)` first checks, on two
short sequences, that the model's packed logits equal its padded ones: an architecture that
ignores the layout (its attention not going through the interface, say) trains padded instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

NAME = "posttrain_packed"
UNSUPPORTED = ("sliding_window", "softcap", "s_aux")  # attention variants the grid attention does not do


@dataclasses.dataclass
class Layout:
    """The padded grid (B, W) of a packed row of N tokens: the packed token in each cell, N for padding
    (B * W,; a shared prefix's token fills a cell in each row that shares it), and the cell each
    packed token's own output is read from (N,)."""

    sources: torch.Tensor
    slots: torch.Tensor
    shape: tuple[int, int]


@dataclasses.dataclass
class Packed:
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N): 0, 1, ... within each sequence
    layout: Layout

    def position_of(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The packed position computing the token at (row, column) of the padded batch (a shared prefix's
        token: the row above's)."""
        return self.layout.sources.view(self.layout.shape)[rows, columns]


def is_right_padded(mask: torch.Tensor) -> bool:
    """Every row's real tokens (mask 1) come first and its padding after: mask == [1]*L_i + [0]*(W - L_i)."""
    lengths = mask.sum(1, keepdim=True)
    return bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


def has_padding(batch: dict) -> bool:
    """Whether any position of the batch is padding (attention_mask 0)."""
    mask = batch.get("attention_mask")
    return mask is not None and not bool(mask.all())


def shared_prefix_lengths(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,): how many leading real tokens each row has in common with the row above (0 for the first row)."""
    same = torch.zeros_like(mask)
    same[1:] = (input_ids[1:] == input_ids[:-1]) & mask[1:] & mask[:-1]
    return same.long().cumprod(-1).sum(-1)


def pack(batch: dict) -> Packed:
    """The real tokens of a right-padded batch (input_ids, attention_mask: (B, W)) in one row, but for the
    leading tokens each row shares with the row above (`shared_prefix_lengths`)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    n_rows, width = mask.shape
    shared = shared_prefix_lengths(ids, mask)  # (B,)
    own = mask & (torch.arange(width, device=mask.device) >= shared[:, None])  # (B, W): cells packed here
    slots = own.flatten().nonzero().squeeze(1)  # (N,)
    sources = torch.full((n_rows, width), len(slots), device=mask.device)  # padding: N, a zero
    sources.view(-1)[slots] = torch.arange(len(slots), device=mask.device)
    for row, length in enumerate(shared.tolist()):  # in order: a prefix shared down several rows names the first's
        if length:
            sources[row, :length] = sources[row - 1, :length]
    layout = Layout(sources=sources.flatten(), slots=slots, shape=(n_rows, width))
    return Packed(ids.flatten()[slots].unsqueeze(0), (slots % width).unsqueeze(0), layout)


def to_grid(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(1, H, N, D) packed -> (B, H, W, D): each cell's token, zeros in padding."""
    rows, width = layout.shape
    tokens = F.pad(x[0].transpose(0, 1), (0, 0, 0, 0, 0, 1))  # (N + 1, H, D): token N is the zero
    return tokens.index_select(0, layout.sources).view(rows, width, *tokens.shape[1:]).transpose(1, 2)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              packed: Layout | None = None, **kwargs):
    """Causal attention of packed q (1, H, N, D), k and v (1, H_kv, N, D), sequence by sequence; returns the
    output as transformers' attention functions do, (1, N, H, D), and no weights."""
    if packed is None:
        raise RuntimeError("posttrain's packed attention ran without a layout: call the model with packed=")
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise RuntimeError(f"packed attention does not implement {', '.join(unsupported)}; train with packing=false")
    q, k, v = (to_grid(x, packed) for x in (query, key, value))  # (B, H, W, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0,
                                         enable_gqa=q.shape[1] != k.shape[1])  # (B, H, W, D)
    rows, heads, width, dim = out.shape
    tokens = out.transpose(1, 2).reshape(rows * width, heads, dim).index_select(0, packed.slots)  # (N, H, D): own cells
    return tokens.unsqueeze(0), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)  # the layout, not a mask, keeps sequences apart


def rounding_tolerance(dtype: torch.dtype) -> float:
    """The relative gap two ways of computing the same logits may show from float rounding alone: 1e-4 in
    float32, 2e-2 in half precision. The model self-checks (`enable`, `forward.chunk_rows`) allow it."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def unwrapped(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


@contextlib.contextmanager
def packed_attention(model):
    """Route the model's attention through `attention` for the duration of the block."""
    config = unwrapped(model).config
    saved = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = saved


def enabled(model) -> bool:
    return getattr(unwrapped(model), "_posttrain_packing", False)


def enable(model) -> bool:
    """Train `model` on packed batches from now on, if it is a transformers language model whose packed logits
    equal its padded ones (checked on two short sequences); otherwise leave it padded, saying why on stderr
    where a language model fails the check. Returns whether packing is on."""
    model = unwrapped(model)
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        return False  # a reward model's scalar head, say: its losses do not read labelled logits
    if not enabled(model):
        gap = packing_gap(model)
        # float rounding differs between the two layouts' kernels; sequences that see each other differ by far
        # more (the embedded model: over a tenth of its largest logit)
        if gap > rounding_tolerance(next(model.parameters()).dtype):
            print(f"note: {type(model).__name__} gave different logits packed and padded (max |diff| {gap:.3g} of "
                  "the largest logit); training on padded batches", file=sys.stderr)
            return False
        model._posttrain_packing = True
    return True


@torch.no_grad()
def packing_gap(model) -> float:
    """Max |logits packed - logits padded| / max |logits padded| over the real tokens of two sequences of 7 and
    4 tokens. Run it before Accelerate wraps the model in autocast: in float32 the two agree to rounding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], device=device)
    batch = {"input_ids": ids, "attention_mask": mask}
    try:
        padded = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]  # (11, V)
        packed = pack(batch)
        with packed_attention(model):
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, packed=packed.layout).logits[0]
        return ((padded - logits).abs().max() / padded.abs().max().clamp(min=1e-6)).item()
    except (TypeError, RuntimeError) as error:  # an architecture that cannot take the packed call at all
        print(f"note: packed call failed ({error})", file=sys.stderr)
        return float("inf")
    finally:
        model.train(was_training)
