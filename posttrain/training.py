"""The one training loop every method uses: explicit, short, resumable.

    for step in range(start, steps):
        batch = batch_fn(step)                   # a pure function of the step: resuming replays it
        loss, metrics = loss_fn(model, micro)    # per micro-batch, gradients accumulated, each weighted
                                                 # by its share of what the loss averages over
        clip grad norm; AdamW step; warmup + cosine learning rate
        every log_every: a line in metrics.jsonl; every checkpoint_every: a checkpoint

Accelerate places the model and data (CPU, one GPU, or several processes under torchrun /
`accelerate launch`, where each rank takes its share of every global batch). A checkpoint holds
the model, optimizer and scheduler state and the step; with batches a pure function of the step,
a run killed and resumed ends where an uninterrupted run ends. With `sharding=fsdp` the processes
shard the weights, gradients and optimizer state (FSDP2, posttrain/sharding.py) instead of each
holding them all. Ctrl-C saves a checkpoint before stopping, and so does SIGTERM (held while a
step updates the weights, so the checkpoint counts exactly the updates it holds; the metrics of its
last step are written; a sharded run's processes all stop after the same step: sharding.py says why);
a NaN or infinite loss stops the run and keeps the last good checkpoint.

A loss is a mean: over the labelled tokens (SFT, distillation: `labelled_token_count`) or over the
rows (DPO's pairs, reward models: `row_count`). Split over micro-batches and processes, the step's
gradient must still be the gradient of the mean over the whole global batch, so micro-batch m's mean
loss L_m is weighted by its share of the units, n_m / N (N: the global batch's), and by the number of
processes W, whose gradients DDP averages:

    backward(L_m * n_m / N * W)  on every rank, for every m    =>    grad (sum_m n_m L_m) / N = grad L

Averaging the micro-batches' means instead (an equal weight each) overweights the tokens of a
micro-batch with few of them, so grad_accum or a second process would change the run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from posttrain import packing, sharding
from posttrain.data import TRUNCATION
from posttrain.config import Range, check_ranges
from posttrain.errors import Interrupted, TrainingInterrupted, UserError, sigterm_as_interrupt
from posttrain.forward import DEFAULT_LOGITS_MB, budget_logits
from posttrain.io import JsonlWriter, atomic_dir, read_json, recover_dir, write_json
from posttrain.losses.sft import labelled_token_count

CHECKPOINT = "checkpoint"


@dataclasses.dataclass
class TrainingConfig:
    """Optimisation settings shared by every training method (method configs extend this)."""

    steps: int = 200  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step (global, over all processes)
    grad_accum: int = 1  # micro-batches per step; batch_size must divide evenly
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup from 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 disables)
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 0  # steps between checkpoints (0: only on Ctrl-C)
    seed: int = 0  # seeds data order, sampling and initialisation
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the training steps' forward and GRPO/PPO's decode step: GPU levers
    packing: bool = True  # run padded batches packed (posttrain/packing.py): no layer computes on padding
    loss_logits_mb: float = DEFAULT_LOGITS_MB  # losses hold at most this many MB of float32 logits, else chunk (0: no limit)
    keep_checkpoint: bool = False  # keep checkpoint/ after the run finishes (removed by default: it would mark the folder as an interrupted run)
    max_length: int = 0  # longest row of SFT/LoRA/DPO data in tokens (0: the model's context, max_position_embeddings)
    truncation: str = "truncate"  # a longer row: truncate (cut its completion; drop it if its prompt fills it) | error
    sharding: str = "ddp"  # several processes: ddp (every rank holds everything) | fsdp (FSDP2 shards; sharding.py)

    @property
    def rollout_decode(self) -> str:
        """The sampler's decode mode for GRPO/PPO rollouts: the compiled static-cache step if `compile`."""
        return "compiled" if self.compile else "dynamic"

    def validate(self) -> None:
        check_ranges(self, TRAINING_RANGES)
        if self.batch_size % self.grad_accum:
            raise UserError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"precision must be auto, fp32 or bf16, got '{self.precision}'")
        if self.truncation not in TRUNCATION:
            raise UserError(f"config key 'truncation' must be one of {', '.join(TRUNCATION)}, got '{self.truncation}'")
        sharding.check_sharding(self.sharding)
        if self.sharding == "fsdp" and self.compile:
            raise UserError("sharding=fsdp does not run with compile=true (its training steps run on the sharded "
                            "copy, not the compiled model); drop one of them")


# What each shared key means bounds it: a negative max_grad_norm would clip by a negative factor (gradient
# ascent), a negative min_lr_ratio turns the cosine's tail into a negative learning rate.
TRAINING_RANGES = {
    "steps": Range(1), "batch_size": Range(1), "grad_accum": Range(1),
    "lr": Range(0.0, low_open=True), "min_lr_ratio": Range(0.0, 1.0), "warmup_steps": Range(0),
    "weight_decay": Range(0.0), "max_grad_norm": Range(0.0), "log_every": Range(1), "checkpoint_every": Range(0),
    "seed": Range(0, 2**32 - 1), "loss_logits_mb": Range(0.0), "max_length": Range(0),
}


@dataclasses.dataclass
class TrainResult:
    history: list  # the logged metric dicts, one per log_every steps
    final_metrics: dict  # the last step's metrics
    time_s: float  # wall time of this run's steps (a resumed run counts its own part)
    tokens_per_s: float  # labelled + context tokens processed per second


def lr_lambda(cfg: TrainingConfig) -> Callable[[int], float]:
    """Linear warmup to 1 over `warmup_length(cfg)` steps, then cosine decay to min_lr_ratio at the last step."""
    warmup = warmup_length(cfg)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def warmup_length(cfg: TrainingConfig) -> int:
    """`warmup_steps`, capped at half of `steps` (printing one line when it is): a run shorter than its warmup
    would otherwise never reach its peak rate (steps=5, warmup_steps=20 peaks at 5/20 of it)."""
    cap = cfg.steps // 2  # warmup_steps <= steps / 2 (whole steps) leaves the schedule unchanged
    if cfg.warmup_steps <= cap:
        return cfg.warmup_steps
    print(f"posttrain: warmup_steps={cfg.warmup_steps} capped at {cap}, half of the schedule's {cfg.steps} steps",
          flush=True)
    return cap


def make_accelerator(precision: str = "auto"):
    from accelerate import Accelerator

    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # cpu=True is what makes Accelerate join a torchrun process group over gloo on CPU-only machines
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available())


def make_optimizer(params, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or parameter groups) with the config's learning rate and weight decay.

    Fused (one kernel for the whole update) on a GPU; the CPU keeps the default for-each implementation,
    so CPU runs reproduce the recorded results bit for bit."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                             fused=torch.cuda.is_available())


def mean_over_processes(metrics: dict, accelerator) -> dict:
    """Each metric averaged over the processes (unchanged on one)."""
    if accelerator.num_processes == 1:
        return metrics
    names = list(metrics)
    values = accelerator.reduce(torch.tensor([float(metrics[k]) for k in names], device=accelerator.device), "mean")
    return dict(zip(names, values.tolist()))


def sum_over_processes(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """`tensor` summed over the processes (itself on one)."""
    return tensor if accelerator.num_processes == 1 else accelerator.reduce(tensor, "sum")


def share_of_all_processes(units: torch.Tensor | int, accelerator) -> float:
    """The weight of this rank's mean loss over `units` (its tokens or rows) that makes the gradient, once DDP
    averages it over the R ranks, that of the mean over every rank's units: units / sum of all ranks' * R
    (1 on one process). For rollouts, which each rank samples itself; `train()` knows the global batch."""
    if accelerator.num_processes == 1:
        return 1.0
    units = torch.as_tensor(units, dtype=torch.float32, device=accelerator.device)
    return (units / sum_over_processes(units, accelerator).clamp(min=1) * accelerator.num_processes).item()


def _shard(batch: dict, rank: int, world: int) -> dict:
    """This process's rows of a global batch (rows rank, rank + world, ...)."""
    return {k: v[rank::world] if torch.is_tensor(v) else v for k, v in batch.items()}


def _check_enough_rows(n_rows: int, processes: int, grad_accum: int) -> None:
    """Every process and micro-batch needs rows of its own (they need not be equally many: see the module
    docstring). The same check on every rank, so all of them stop."""
    if n_rows < processes * grad_accum:
        raise UserError(f"a step's batch of {n_rows} rows cannot give each of {processes} process(es) "
                        f"{grad_accum} micro-batch(es) (grad_accum); raise batch_size or lower grad_accum")


def _micro_batches(batch: dict, n: int) -> list[dict]:
    rows = row_count(batch)
    size = math.ceil(rows / n)
    return [{k: v[i : i + size] if torch.is_tensor(v) else v for k, v in batch.items()} for i in range(0, rows, size)]


COUNT_METRICS = ("tokens",)  # metrics that count (the losses' labelled tokens): summed, where the rest are means


def row_count(batch: dict) -> int:
    """What a row-mean loss averages over: the rows (DPO's pairs, a reward model's pairs or solutions)."""
    return len(batch["input_ids"])


def _count_tokens(batch: dict) -> int:
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, extra: dict | None = None) -> None:
    """The model's trainable weights and buffers, the optimizer's and scheduler's state and the step, written
    atomically, with `extra` (file name -> JSON object: a caller's own state) beside them; a disk without room for
    them fails in one line, the previous checkpoint left as it was. Every rank calls it (a sharded model's state
    is gathered from all of them); rank 0 writes."""
    weights, optimizer_state = (sharding.full_state(model, optimizer) if sharding.is_sharded(model)
                                else (model.state_dict(), optimizer.state_dict()))
    if not sharding.main_rank():
        return
    state = {k: v.detach().contiguous() for k, v in weights.items() if _trainable_or_buffer(model, k)}
    optimization = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
    with atomic_dir(directory, state_bytes(state, optimization), "a checkpoint") as tmp:
        for name, obj in (extra or {}).items():
            write_json(Path(tmp) / name, obj)
        save_file(_untie(state), str(Path(tmp) / "model.safetensors"))
        torch.save(optimization, Path(tmp) / "optimizer.pt")
        write_json(Path(tmp) / "state.json", {"step": step})


def state_bytes(*states) -> int:
    """Bytes of the tensors in `states` (nested dicts, lists and tuples of them): what saving them writes."""
    total = 0
    for state in states:
        if torch.is_tensor(state):
            total += state.numel() * state.element_size()
        elif isinstance(state, dict):
            total += state_bytes(*state.values())
        elif isinstance(state, (list, tuple)):
            total += state_bytes(*state)
    return total


def _trainable_or_buffer(model, key: str) -> bool:
    params = dict(model.named_parameters())
    return key not in params or params[key].requires_grad


def _untie(state: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): store a copy of each repeat."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> int:
    """Restore a checkpoint into the live objects (a sharded model: every rank reads it whole and keeps its
    shards); returns the number of steps already done. A damaged file or another model's checkpoint is a
    `UserError` naming it, raised before the model changes; the checkpoint's files are only read."""
    weights = _read_checkpoint_file(directory / "model.safetensors", lambda path: load_file(str(path)))
    _check_weights_fit(directory, model, weights)
    saved = _read_checkpoint_file(directory / "optimizer.pt", lambda path: torch.load(path, weights_only=True))
    step = _read_checkpoint_file(directory / "state.json", lambda path: int(read_json(path)["step"]))
    try:
        if sharding.is_sharded(model):
            sharding.load_full_state(model, optimizer, weights, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{directory / 'optimizer.pt'} does not fit this run's optimizer ({_first_line(exc)}); "
                        "the checkpoint is from another run or model, or of the other sharding") from None
    if not sharding.is_sharded(model):
        model.load_state_dict(weights, strict=False)
    return step


def _read_checkpoint_file(path: Path, read: Callable[[Path], object]):
    """`read(path)`, with whatever a truncated, garbage or refused file raises turned into one line."""
    try:
        return read(path)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and JSON readers each fail their own way
        raise UserError(f"checkpoint file {path} cannot be read ({type(exc).__name__}: {_first_line(exc)}); "
                        "it was left as it is: move the checkpoint away to train from the start") from None


def _check_weights_fit(directory: Path, model, weights: dict) -> None:
    """The checkpoint holds exactly the model's trainable weights and buffers, each of the model's shape."""
    expected = {k: v.shape for k, v in model.state_dict().items() if _trainable_or_buffer(model, k)}
    foreign = sorted(set(weights) ^ set(expected)) or sorted(k for k in weights if weights[k].shape != expected[k])
    if foreign:
        raise UserError(f"checkpoint {directory} does not match this model ({len(foreign)} weight(s) missing, "
                        f"unexpected or of another shape, e.g. {foreign[:3]}); it is another model's or run's")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def train(
    model,
    batch_fn: Callable[[int], dict],
    loss_fn: Callable[[object, dict], tuple[torch.Tensor, dict]],
    cfg: TrainingConfig,
    output_dir: str | Path,
    *,
    resume: bool = False,
    eval_fn: Callable[[int], dict] | None = None,
    eval_every: int = 0,
    desc: str = "train",
    averages_over: Callable[[dict], int] = labelled_token_count,
    batch_reads_model: bool = False,
) -> TrainResult:
    """Optimise the trainable parameters of `model` for `cfg.steps` steps; see the module docstring.
    `averages_over(batch)` counts what `loss_fn`'s mean is taken over (`labelled_token_count` or `row_count`).
    Under `sharding=fsdp` the steps train a sharded copy (sharding.py), gathered back into `model` for
    `eval_fn`, for `batch_fn` if `batch_reads_model` (a student sampling its own rows) and at the end, so the
    caller finds `model` trained either way."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg.precision)
    torch.manual_seed(cfg.seed)
    prepare_for_losses(model, cfg)
    home = model  # what the caller holds: evaluated between steps, trained at the end
    model = shard_for_training(home, cfg, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ckpt = output_dir / CHECKPOINT
    recover_dir(ckpt)  # a checkpoint write killed part-way
    start = 0
    if resume:
        if not (ckpt / "state.json").exists():
            raise UserError(f"--resume: no checkpoint in {output_dir} (expected {ckpt}/state.json)")
        start = load_checkpoint(ckpt, model, optimizer, scheduler)
    model, optimizer = prepare_trained(accelerator, optimizer, model)
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    compiled = compiled_forward(unwrapped, cfg.compile)

    history, last_metrics, tokens, completed, logged = [], {}, 0, start, start
    main_process = accelerator.is_main_process  # only rank 0 writes files
    writer = JsonlWriter(output_dir / "metrics.jsonl", resume_step=start) if main_process else None
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not main_process, dynamic_ncols=True)
    t0 = time.perf_counter()
    sharded = sharding.is_sharded(unwrapped)
    try:
        with sigterm_as_interrupt(), interrupts_at_step_boundaries(sharded) as stop_requested:
            for step in range(start, cfg.steps):
                with sharding.gathered(home, unwrapped) if batch_reads_model else contextlib.nullcontext():
                    global_batch = batch_fn(step)
                _check_enough_rows(row_count(global_batch), accelerator.num_processes, cfg.grad_accum)
                batch = _shard(global_batch, accelerator.process_index, accelerator.num_processes)
                with forward_as(unwrapped, compiled), interrupts_held(not sharded):
                    metrics = _optimizer_step(model, optimizer, batch, loss_fn, cfg, accelerator,
                                              averages_over, averages_over(global_batch))
                    scheduler.step()
                    completed = step + 1
                    tokens += metrics.pop("_tokens")
                    last_metrics = {"step": completed, **metrics, "lr": scheduler.get_last_lr()[0]}
                if not math.isfinite(metrics["loss"]):
                    where = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written"
                    raise UserError(
                        f"training diverged: loss is {metrics['loss']} at step {step + 1}; {where}. "
                        "Try a lower lr or a smaller max_grad_norm."
                    )
                evaluated = bool(eval_fn and eval_every and (step + 1) % eval_every == 0)
                if evaluated:
                    with sharding.gathered(home, unwrapped):
                        last_metrics.update(eval_fn(step + 1))
                    model.train()
                if evaluated or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    history.append(last_metrics)
                    if main_process:
                        writer.log(last_metrics)
                    logged = completed
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, unwrapped, optimizer, scheduler, step + 1)  # every rank: see its docstring
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if signum := stop_requested():
                    raise Interrupted(signum)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if main_process and logged < completed:  # the metrics of the step the checkpoint ends with
            writer.log(last_metrics)
        if main_process or sharded:  # a sharded model's state is gathered from every rank
            save_checkpoint(ckpt, unwrapped, optimizer, scheduler, completed)
        raise TrainingInterrupted(
            f"interrupted ({signal.Signals(signum).name}) after step {completed}; checkpoint saved in {ckpt}. "
            "Run the same command with --resume to continue.", signum
        ) from None
    finally:
        bar.close()
        if writer:
            writer.close()
    elapsed = time.perf_counter() - t0
    model.eval()
    if sharded:
        sharding.fill(home, unwrapped)
        home.eval()
    return TrainResult(history, last_metrics, elapsed, tokens / max(elapsed, 1e-9))


def shard_for_training(model, cfg: TrainingConfig, accelerator):
    """The module the optimizer trains: `model` itself, or under `sharding=fsdp` on several processes its
    FSDP2-sharded copy, `model` holding no weights until `sharding.fill` gathers them (sharding.py). Call it
    after `prepare_for_losses`, which the copy inherits."""
    return sharding.shard_copy(model) if sharding.active(cfg, accelerator) else model


def shard_frozen(model, cfg: TrainingConfig, accelerator):
    """A frozen model beside the trained one (a reference, a teacher) sharded in place under `sharding=fsdp` on
    several processes, so each rank holds 1/W of its weights; every rank must then run the same forwards of it
    (they do: the updates' micro-batches and the held-out measurements are the same on every rank), and it
    samples nothing (ranks sampling stop after different numbers of steps). Else `model`."""
    return sharding.shard_in_place(model) if model is not None and sharding.active(cfg, accelerator) else model


def prepare_trained(accelerator, optimizer, *modules):
    """Accelerate's preparation: the trained modules (DDP-wrapped on several processes) and the optimizer,
    returned as (*modules, optimizer); sharded modules are left to FSDP2, only their optimizer prepared."""
    if any(sharding.is_sharded(m) for m in modules):
        return (*modules, accelerator.prepare(optimizer))
    return accelerator.prepare(*modules, optimizer)


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """Within the block SIGINT and SIGTERM are appended to the yielded list instead of acting (the main thread
    only: elsewhere signals cannot be caught, and nothing is recorded)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in HELD_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_at_step_boundaries(sharded: bool):
    """Yields `stop_requested()`: called by every rank after each step, the first signal any rank received (0:
    none). For a `sharded` run SIGINT and SIGTERM are only recorded inside the block, and `stop_requested` asks
    every rank (one all-reduce of one number), so all ranks stop after the same step and gather one checkpoint
    together: stopping where each received its signal would pair the gather with another rank's training
    collectives. Otherwise signals act at once (interrupts_held) and `stop_requested` is always 0."""
    if not sharded:
        yield lambda: 0
        return
    with _signals_recorded() as received:
        yield lambda: sharding.first_signal(received[0] if received else 0)


@contextlib.contextmanager
def interrupts_held(active: bool = True):
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then raise the first as `Interrupted`: an optimizer
    step, the scheduler's and the count of steps done move together, so a checkpoint saved on an interrupt never
    holds a step its count misses (resuming would apply it twice). Outside the main thread, where signals cannot
    be caught, a no-op; so with `active` false (a sharded run, whose signals interrupts_at_step_boundaries holds
    to the step's end on every rank)."""
    if not active:
        yield
        return
    with _signals_recorded() as received:
        yield
    if received:
        raise Interrupted(received[0])


def prepare_for_losses(model, cfg: TrainingConfig, *frozen) -> None:
    """Before Accelerate wraps `model` (its checks run outside autocast): pack its batches if `cfg.packing`
    (`packing.enable`, and those of the `frozen` reference models that exist) and give its losses
    `cfg.loss_logits_mb`."""
    if cfg.packing:
        for each in (model, *(f for f in frozen if f is not None)):
            packing.enable(each)
    budget_logits(model, cfg.loss_logits_mb)


def compiled_forward(module, enabled: bool) -> Callable | None:
    """torch.compile of `module.forward` when `enabled` (cfg.compile), for `forward_as`; else None."""
    return torch.compile(module.forward) if enabled else None


@contextlib.contextmanager
def forward_as(module, forward: Callable | None):
    """Run the block with `forward` (a compiled version, say) standing in for `module.forward`, if given.

    Only the training steps run compiled; evaluation and generation between them, with other shapes,
    stay eager rather than recompiling."""
    if forward is None:
        yield
        return
    module.forward = forward  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del module.forward


def _optimizer_step(model, optimizer, batch: dict, loss_fn, cfg: TrainingConfig, accelerator,
                    averages_over: Callable[[dict], int] = labelled_token_count,
                    global_units: int | None = None) -> dict:
    """One optimizer step over `cfg.grad_accum` micro-batches of this rank's share of a global batch of
    `global_units` (default: `batch` is the whole of it; see the module docstring); returns the metrics
    weighted alike, the global batch's."""
    global_units = averages_over(batch) if global_units is None else global_units
    micro_batches = _micro_batches(batch, cfg.grad_accum)
    totals: dict = {}
    for i, micro in enumerate(micro_batches):
        weight = averages_over(micro) / max(global_units, 1) * accelerator.num_processes
        micro = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in micro.items()}
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # DDP reduces the gradients once
            with accelerator.autocast():
                loss, metrics = loss_fn(model, micro)
            accelerator.backward(loss * weight)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + (v if k in COUNT_METRICS else v * weight)
        totals["_tokens"] = totals.get("_tokens", 0) + _count_tokens(micro)
    # report the global batch's metrics, not this rank's share: means weighted as the loss, counts summed
    reduced = mean_over_processes({k: v for k, v in totals.items() if k != "_tokens"}, accelerator)
    totals.update({k: v * accelerator.num_processes if k in COUNT_METRICS else v for k, v in reduced.items()})
    if cfg.max_grad_norm:
        totals["grad_norm"] = sharding.as_float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals
