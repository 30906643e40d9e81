"""Sharded training (`sharding=fsdp`): PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), so each of W
processes holds 1/W of the trained weights, their gradients and AdamW's moments instead of all of them (DDP).

Fully Sharded Data Parallel (Zhao et al. 2023, "PyTorch FSDP", after ZeRO-3, Rajbhandari et al. 2020): every
parameter is cut into W shards along its first dimension (a DTensor); a sharded module all-gathers its
parameters before its forward and frees them after, and its gradients are reduce-scattered, each rank keeping
the mean over the ranks of its own shard's gradient, as DDP's all-reduce would; the optimizer steps on the
shards. Each decoder layer is one unit (one all-gather in its forward), then the root takes what is left (the
embeddings, the final norm and the output layer; tied embeddings stay one parameter).

    per rank:   DDP  4N weights + 4N grads + 8N AdamW          =  16 N bytes (fp32, N trained parameters)
                FSDP (4N + 4N + 8N) / W + one layer gathered  ~=  16 N / W bytes

Why `fully_shard` itself rather than Accelerate's FSDP plugin (fsdp_version=2): the plugin turns on only for
processes of a GPU kind, so a CPU test could not reach it, and it hides what sharding does behind a config
file. Calling `fully_shard` on the layers and the root is the whole wrapping, in view, and runs over gloo on
CPU processes as over NCCL on GPUs. Accelerate still places data and runs autocast; it never sees the model.

The model a method loads stays its plain model (`home`): `shard_copy` shards a copy for the optimizer and
frees `home`'s parameter storage while the training steps run; `fill` gathers the trained weights back into
it whenever something other than a training step needs the model, and at the end. So evaluation, sampling and
saving run on a plain model as on one process, and only the training steps see DTensors. Sampling under FSDP
needs this: a sharded forward is a collective, and ranks sampling their own prompts stop after different
numbers of decode steps, which would leave one rank waiting for an all-gather the others never start. The
cost: one all-gather of the whole model per gather (per GRPO rollout batch, per evaluation) and its 4N bytes
on every rank while it lasts, as DDP holds them always.

Checkpoints are gathered whole (rank 0 writes a model and optimizer state of the same form as one process's;
the optimizer's keyed by parameter name) at step boundaries, where every rank is. So is the checkpoint of an
interrupt: Ctrl-C and SIGTERM are only recorded while a sharded run trains, and after each step the ranks
agree (`first_signal`, one all-reduce) whether any received one; all then stop after that same step and
gather its checkpoint together (training.interrupts_at_step_boundaries).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist

from posttrain.errors import UserError

SHARDINGS = ("ddp", "fsdp")


def check_sharding(value: str) -> None:
    if value not in SHARDINGS:
        raise UserError(f"config key 'sharding' must be one of {', '.join(SHARDINGS)}, got '{value}'")


def active(cfg, accelerator) -> bool:
    """Whether to shard: `sharding=fsdp` on several processes. On one process there is nothing to shard
    across, and the run is the plain single-process run."""
    return getattr(cfg, "sharding", "ddp") == "fsdp" and accelerator.num_processes > 1


def main_rank() -> bool:
    """True outside distributed runs and on rank 0: the process that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, torch.nn.Module) and any(isinstance(m, FSDPModule) for m in model.modules())


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model: modules of the classes its `_no_split_modules` names
    (LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block...), outermost only; else the entries of `model.model.layers`."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers, inside = [], []
    for prefix, module in model.named_modules():
        if type(module).__name__ in names and not any(prefix.startswith(p + ".") for p in inside):
            layers.append(module)
            inside.append(prefix)
    if layers:
        return layers
    inner = getattr(model, "model", None)
    return list(getattr(inner, "layers", []))


def shard_copy(home: torch.nn.Module) -> torch.nn.Module:
    """A copy of `home` sharded with FSDP2, each decoder layer (with the LoRA adapters inside it) one unit, then
    the root; `home`'s parameters are emptied (`release`) until `fill` gathers them back."""
    sharded = copy.deepcopy(home)
    release(home)
    return shard_in_place(sharded)


def shard_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """`model` sharded with FSDP2: each decoder layer one unit, then the root. A frozen model (a reference, a
    teacher) is sharded so, in place: it is only run forward, each forward a collective every rank joins."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def release(home: torch.nn.Module) -> None:
    """Free `home`'s parameter storage; the Parameter objects stay (tied weights stay one)."""
    for param in home.parameters():
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


@torch.no_grad()
def fill(home: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """Gather every parameter of `sharded` whole into `home` (a collective: every rank calls it)."""
    params = dict(home.named_parameters())
    for name, param in sharded.named_parameters():  # the same order on every rank: the same all-gathers
        params[name].data = param.full_tensor()


@contextlib.contextmanager
def gathered(home: torch.nn.Module, trained):
    """`home` holding the trained weights for the block (a no-op when `trained` is not sharded)."""
    if not is_sharded(trained):
        yield
        return
    fill(home, trained)
    try:
        yield
    finally:
        release(home)


def full_state(model, optimizer) -> tuple[dict, dict]:
    """The model's whole state dict and the optimizer's (keyed by parameter name), on rank 0's CPU; other
    ranks get empty dicts. A collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, _raw(optimizer), options=options))


def load_full_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Shard a whole state (every rank read the same checkpoint) into the sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, _raw(optimizer), optimizer_state, options=StateDictOptions(full_state_dict=True))


def first_signal(received: int) -> int:
    """The largest of the ranks' `received` signal numbers (0: none received): every rank learns whether any
    rank was asked to stop. A collective."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([received], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer keeps it in .optimizer


def as_float(norm) -> float:
    """A gradient norm as a number; under FSDP2 `clip_grad_norm_` may return a DTensor (a collective)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
