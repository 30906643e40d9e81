"""Padding-free training: the rows of a padded batch laid end to end, so no layer computes on padding.

    padded (B, W), right-padded       packed (1, N): the N real tokens, row after row
    [a a a a . .]                     input_ids     [a a a a b b b b b b c c c]
    [b b b b b b]                     position_ids  [0 1 2 3 0 1 2 3 4 5 0 1 2]   (each sequence from 0)
    [c c c . . .]                     slots         [0 1 2 3 6 7 8 9 10 11 12 13 14]  (index in the B x W grid)

Every layer of a decoder except attention works token by token (embeddings, norms, projections,
MLPs, the output layer), so on the packed row it does the work of the N real tokens instead of the
B x W grid: with sequences of mixed lengths, half the grid can be padding. Attention must not cross
from one sequence into the next. `attention` puts each layer's queries, keys and values back into
the grid by `slots` (B, H, W, D), runs causal scaled-dot-product attention per row there, and takes
the real tokens' outputs back out: the attention of the padded batch, where only real tokens start
rows and pads only follow them, so causality alone keeps them out. (Flash-attention's variable-length
kernels do the same without the grid; this is the portable version, CPU included.)

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
    """Where each packed token sits in the padded grid: slots (N,) into B x W, its row (N,), the grid's shape."""

    slots: torch.Tensor
    rows: torch.Tensor
    shape: tuple[int, int]


@dataclasses.dataclass
class Packed:
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N): 0, 1, ... within each sequence
    labels: torch.Tensor | None  # (N,), where the batch has labels
    layout: Layout

    def sequence_starts(self) -> torch.Tensor:
        """(N,) bool: the first token of each sequence, which no position of the row before it predicts."""
        return self.position_ids[0] == 0


def is_right_padded(mask: torch.Tensor) -> bool:
    """Every row's real tokens (mask 1) come first and its padding after: mask == [1]*L_i + [0]*(W - L_i)."""
    lengths = mask.sum(1, keepdim=True)
    return bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


def has_padding(batch: dict) -> bool:
    """Whether any position of the batch is padding (attention_mask 0)."""
    mask = batch.get("attention_mask")
    return mask is not None and not bool(mask.all())


def pack(batch: dict) -> Packed:
    """The real tokens of a right-padded batch (input_ids, attention_mask, optional labels: (B, W)) in one row."""
    mask = batch["attention_mask"].bool()  # (B, W)
    n_rows, width = mask.shape
    columns = torch.arange(width, device=mask.device).expand(n_rows, width)
    row_of = torch.arange(n_rows, device=mask.device).unsqueeze(1).expand(n_rows, width)
    labels = batch["labels"][mask] if "labels" in batch else None
    layout = Layout(slots=mask.flatten().nonzero().squeeze(1), rows=row_of[mask], shape=(n_rows, width))
    return Packed(batch["input_ids"][mask].unsqueeze(0), columns[mask].unsqueeze(0), labels, layout)


def to_grid(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(1, H, N, D) packed -> (B, H, W, D) padded with zeros."""
    rows, width = layout.shape
    tokens = x[0].transpose(0, 1)  # (N, H, D)
    grid = tokens.new_zeros(rows * width, *tokens.shape[1:]).index_copy(0, layout.slots, tokens)
    return grid.view(rows, width, *tokens.shape[1:]).transpose(1, 2)


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
    tokens = out.transpose(1, 2).reshape(rows * width, heads, dim).index_select(0, packed.slots)  # (N, H, D)
    return tokens.unsqueeze(0), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)  # the layout, not a mask, keeps sequences apart


def rounding_tolerance(dtype: torch.dtype) -> float:
    """The relative gap two ways of computing the same logits may show from float rounding alone: 1e-4 in
    float32, 2e-2 in half precision. The model self-checks (`enable`, `losses.sft.chunk_rows`) allow it."""
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
        # more (the embedded model: 0.14 of its largest logit)
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
