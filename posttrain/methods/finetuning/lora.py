"""LoRA fine-tuning: train a low-rank update of chosen weights, freeze everything else.

    y = W x + (alpha / r) B A dropout(x)       only A (r x in) and B (out x r) are trained

(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3; the layer itself is
in `posttrain/lora.py`.) The run fine-tunes the base model with LoRA on the same demonstrations as
`posttrain sft` (chain-of-thought solutions of 3-digit addition) and measures what the method
promises against full fine-tuning on the same data and the same number of steps:

  - trainable vs total parameters (LoRA on the attention projections at r = 8: 3.5% of the model)
  - held-out accuracy of LoRA and of full fine-tuning
  - a rank sweep (r = 1, 2, 4, 8, 16): accuracy, trainable parameters, wall time, peak memory
  - the adaptation magnitude ||(alpha/r) B A|| / ||W|| (Frobenius) of every adapted layer over training
  - that merging (W' = W + (alpha/r) B A) leaves the logits unchanged

Departures from the paper, and why: the paper adapts only W_q and W_v of GPT-3; here all four
attention projections are adapted by default. At 0.9M parameters every rank counts: r = 8 on the
attention projections trains 32,768 parameters (3.5% of the model), while adding the three MLP
projections would train 81,920 (8.3%, over the project's 5% budget). The sweep keeps alpha / r
fixed at the main run's value (2), so the learning rate means the same at every rank. LoRA needs
a higher learning rate than full fine-tuning (1e-2 vs 1e-3): its update starts at zero and grows
through a product B A. Dropout defaults to 0: 150 steps of 32 rows see each of the 4,000
demonstrations about once, so there is little to regularise (`dropout=0.05` turns it on).

The loss sits on a plateau and then drops once the model learns to fetch the second number's
hundreds digit for the third column (before that it writes 250+333's third step as 2+2). When that
happens depends on the data order and on the base model, which depends on the CPU: at 100 steps some
seeds are still on the plateau, at 150 every seed is past it, for LoRA and full fine-tuning alike.
Hence 150 steps, at a price: the six trainings of the default run go over the 2-minute budget on two
CPU cores; `ranks=` skips the sweep (LoRA and full fine-tuning only). A step is matrix work
(`aten::mm` half of it), and halving the batch to 16 rows to halve the time loses the result: most
seeds stay on the plateau.
Peak training memory is lower than full fine-tuning's by more than the gradients and AdamW state saved,
because a frozen layer need not keep its input for the backward pass.

With a chat model and no `--data` (`--model posttrain:smollm2-135m`), the data and measurements are
`posttrain sft`'s on the chat world (worked 2-digit additions asked in words; the NLL of the start model's
replies to requests outside the task), and the preset trains one adapter on every projection.

With `--data FILE.jsonl` the held-out records and their measures are `posttrain sft`'s: the mean NLL per
completion token (`heldout_nll`, in every comparison row too) beside exact match, on at most `eval_problems`
records of a seeded held-out tenth.

Outputs: `adapter/` (PEFT format: `PeftModel.from_pretrained(base, "adapter")` loads it), `model/`
(the merged model, an ordinary HF folder), `summary.json`, `metrics.jsonl`, `rank_sweep.png`,
`adaptation_magnitude.png`, and the runs of the comparison under `runs/`.

    posttrain lora --output-dir runs/lora
    posttrain lora --model Qwen/Qwen2.5-0.5B --data my.jsonl r=16 ranks= full_ft=false
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from posttrain import lora
from posttrain.chat_world import GeneralProbe, training_pairs, uses_chat_world
from posttrain.config import check_choice
from posttrain.data import EncodedDataset, RowLimit, encode_rows
from posttrain.errors import UserError
from posttrain.forward import causal_lm_loss
from posttrain.methods.common import (eval_skill, headline, policy_path, prepare_output, resumable, save_policy,
                                      world_examples, write_samples, write_summary)
from posttrain.methods.finetuning.sft import evaluate_chat, evaluate_records, prompt_of
from posttrain.models import DEFAULT_MODEL, count_params, load_model, resolve_model_path
from posttrain.records import read_sft, split_records
from posttrain.report.lora_plots import adaptation_curves, rank_sweep_panels
from posttrain.training import CHECKPOINT, TrainingConfig, train
from posttrain.world import FORMATS, MAIN_SKILL, SKILLS


@dataclasses.dataclass
class LoRAConfig(TrainingConfig):
    model: str = DEFAULT_MODEL  # embedded model name, sft-policy[-quick], local folder or hub id
    data: str | None = None  # JSONL of prompt/completion (or messages) records; default: world problems
    output_dir: str = "runs/lora"  # where summary.json, the adapter, plots and the merged model go
    skill: str = MAIN_SKILL  # world skill to fine-tune on
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [3])  # digits of training and test problems
    format: str = "cot"  # solution format of the demonstrations: cot | direct | instruction
    train_examples: int = 4000  # demonstrations drawn from the train split
    eval_problems: int = 300  # held-out test problems for accuracy
    r: int = 8  # LoRA rank of the main run
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the input of the low-rank path (no use here: under one epoch of data)
    # names of the linear layers that get adapters (all four attention projections; see the docstring)
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    ranks: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16])  # rank sweep ([] skips it)
    full_ft: bool = True  # also fine-tune all weights on the same data and steps, for comparison
    full_ft_lr: float = 1e-3  # learning rate of that full fine-tuning
    magnitude_every: int = 10  # steps between records of ||BA|| / ||W|| (0: off)
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 10

    def validate(self) -> None:
        super().validate()
        check_choice("skill", self.skill, SKILLS)
        check_choice("format", self.format, FORMATS)
        if self.r < 1 or any(r < 1 for r in self.ranks):
            raise UserError(f"LoRA ranks must be >= 1, got r={self.r}, ranks={self.ranks}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UserError("target_modules must name at least one linear layer, e.g. [q_proj,v_proj]")


CONFIG = LoRAConfig
# The real pretrained chat model: one adapter at r = 8 on every attention and MLP projection (1.8% of its
# 134.5M parameters), on the same data and steps as sft's preset, which is its full fine-tuning comparison.
PRESETS = {"posttrain:smollm2-135m": {
    "difficulties": "2", "train_examples": 2000, "steps": 30, "batch_size": 16, "lr": 2e-3, "warmup_steps": 3,
    "eval_problems": 300, "ranks": "", "full_ft": False,
    "target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
}}
# --quick: a smoke-sized run for tests and the quick demonstration. It adapts the shared quick SFT
# policy (2-digit addition, with errors left to fix; the quick base model barely moves in this many
# steps). 90 steps leave it near perfect; 60 leave errors.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "steps": 90, "train_examples": 1000,
         "eval_problems": 100, "ranks": "8", "magnitude_every": 10}
# A user's model or --data: one adapter at rank r, without the full fine-tuning baseline and the rank sweep
# (with them a run trains seven models); full_ft=true or ranks=1,2,4 asks for them.
USER_DEFAULTS = {"full_ft": False, "ranks": []}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): the adapter's learning rate of PEFT's
# examples (TRL sets none for LoRA) and, for full_ft, TRL 1.16's SFTConfig one (trl/trainer/sft_config.py).
LARGE_MODEL = {"lr": 2e-4, "full_ft_lr": 2e-5}


def fit(model, dataset: EncodedDataset, cfg: LoRAConfig, lr: float, out: Path, resume: bool, desc: str, eval_fn=None):
    """Train `model`'s trainable parameters on `dataset` at `lr` into `out`; returns the TrainResult."""
    resume = resume and (out / CHECKPOINT / "state.json").exists()
    return train(model, dataset.batch, causal_lm_loss, dataclasses.replace(cfg, lr=lr), out, resume=resume, desc=desc,
                 eval_fn=eval_fn, eval_every=cfg.magnitude_every if eval_fn else 0)


def peak_training_memory(model, dataset: EncodedDataset, cfg: LoRAConfig, lr: float) -> float:
    """Peak tensor memory (MB) that two training steps of a copy of `model` allocate beyond its weights.

    That is gradients, optimizer state and activations: what LoRA saves. Process-level figures (peak
    RSS) are dominated by allocator and library noise at this model size, so this counts tensor
    allocations and frees as the PyTorch profiler records them, in time order, and takes the peak of
    the running total. Two steps, because AdamW allocates its state during the first.
    """
    probe = copy.deepcopy(model)
    activities = [ProfilerActivity.CUDA] if next(probe.parameters()).is_cuda else []
    with tempfile.TemporaryDirectory() as scratch, stderr_silenced(), \
            profile(activities=[ProfilerActivity.CPU, *activities], profile_memory=True) as prof:
        two_steps = dataclasses.replace(cfg, lr=lr, steps=2, warmup_steps=1, log_every=2)
        train(probe, dataset.batch, causal_lm_loss, two_steps, scratch, desc="memory probe")
    device = next(probe.parameters()).device.type
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name.lower() == device)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


@contextlib.contextmanager
def stderr_silenced():
    """Send the process's stderr (file descriptor 2) to /dev/null for the duration.

    The profiler's C++ side prints a `USDT: ... profiler_start` and a `profiler_stop` line on every
    use, and no setting turns them off; the memory probe's progress bar goes with them. An exception
    raised inside still propagates and is reported once stderr is back.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def adapted(base: str, cfg: LoRAConfig, r: int):
    """A fresh base model with LoRA of rank r injected (alpha / r held at the main run's ratio).

    A's random initialisation comes from cfg.seed alone, so a rank's result does not depend on which runs
    came before it in the process (or were skipped by --resume)."""
    model, _ = load_model(base)
    return lora.inject(model, cfg.target_modules, r, cfg.alpha * r / cfg.r, cfg.dropout, seed=cfg.seed)


def variant_row(name: str, model, result, evaluation: dict, memory_mb: float) -> dict:
    params = count_params(model)
    nll = {"heldout_nll": evaluation["heldout_nll"]} if "heldout_nll" in evaluation else {}  # --data runs
    return {"variant": name, "accuracy": evaluation["accuracy"], **nll, **params,
            "trainable_fraction": params["trainable"] / params["total"], "time_s": result.time_s,
            "peak_memory_mb": memory_mb}


@torch.no_grad()
def merge_gap(model, batch: dict) -> float:
    """Max |logits(adapter) - logits(merged)| on `batch`, dropout off; the model is left unmerged."""
    model.eval()
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = lambda: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    adapter_logits = logits()
    lora.merge(model)
    gap = (adapter_logits - logits()).abs().max().item()
    lora.unmerge(model)
    return gap


WORLD_KEYS = ("skill", "difficulties", "format", "train_examples")  # read by world runs only: not in a --data summary


def run(cfg: LoRAConfig, resume: bool = False) -> dict:
    started = time.perf_counter()
    records = read_sft(cfg.data) if cfg.data else None  # bad data fails before anything slow
    out = prepare_output(cfg.output_dir, resume)
    base = resolve_model_path(policy_path(cfg.model))  # a folder or hub id (sft-policy[-quick]: the shared SFT policy)
    model, tokenizer = load_model(base)
    chat = uses_chat_world(tokenizer, cfg.data)
    if records:
        records, held_out = split_records(records, cfg.seed, cfg.eval_problems)
        pairs = [(prompt_of(r), r.completion) for r in records]
        evaluate_fn = lambda m: evaluate_records(m, tokenizer, held_out)  # noqa: E731
    elif chat:  # a chat model: world additions asked as requests, worked solutions in sentences (world/chat.py)
        pairs = training_pairs(cfg.difficulties, cfg.train_examples, cfg.seed, worked=cfg.format == "cot")
        probe = GeneralProbe.of(model, tokenizer)  # the start model's replies outside the task
        evaluate_fn = lambda m: evaluate_chat(m, tokenizer, cfg, probe)  # noqa: E731
    else:
        pairs = world_examples(cfg.skill, cfg.difficulties, cfg.train_examples, cfg.format, cfg.seed)
        evaluate_fn = lambda m: eval_skill(  # noqa: E731
            m, tokenizer, cfg.skill, cfg.difficulties, cfg.eval_problems, cfg.format, cfg.seed)
    encoded = encode_rows(tokenizer, pairs, RowLimit.of(cfg, model))
    dataset = EncodedDataset(encoded.rows, tokenizer.pad_token_id, cfg.batch_size, cfg.seed)
    baseline = headline(evaluate_fn(model))
    del model

    # The main run: LoRA at rank r, recording how far each adapted weight moves.
    model = adapted(base, cfg, cfg.r)
    magnitudes = {"step": [], "layers": {}}

    def record_magnitudes(step: int) -> dict:
        ratios = lora.adaptation_magnitudes(model)
        magnitudes["step"].append(step)
        for name, value in ratios.items():
            magnitudes["layers"].setdefault(name, []).append(value)
        return {"adaptation_mean": sum(ratios.values()) / len(ratios)}

    def run_variant(name: str, variant, lr: float, folder: Path, eval_fn=None):
        """Measure memory, train, evaluate: (sweep row, TrainResult, evaluation)."""
        memory_mb = peak_training_memory(variant, dataset, cfg, lr)
        result = fit(variant, dataset, cfg, lr, folder, resume, name, eval_fn)
        evaluation = evaluate_fn(variant)
        return variant_row(name, variant, result, evaluation, memory_mb), result, evaluation

    main_row, result, after = run_variant(f"lora r={cfg.r}", model, cfg.lr, out, record_magnitudes)
    gap = merge_gap(model, dataset.batch(0))
    save_policy(model, tokenizer, out, base)

    # The same data and steps with every weight trained, then the other ranks. A finished one leaves
    # its row in result.json, which --resume reads back instead of training it again.
    comparison = {}
    if cfg.full_ft:
        folder = out / "runs" / "full"
        comparison = resumable(folder / "result.json", resume, lambda: run_variant(
            "full fine-tuning", load_model(base)[0], cfg.full_ft_lr, folder)[0])
    sweep = []
    for r in cfg.ranks:  # the main run stands in for its own rank
        folder = out / "runs" / f"r{r}"
        row = main_row if r == cfg.r else resumable(folder / "result.json", resume, lambda: run_variant(
            f"lora r={r}", adapted(base, cfg, r), cfg.lr, folder)[0])
        sweep.append({**row, "r": r})

    if sweep:
        rank_sweep_panels(sweep, comparison or None, out / "rank_sweep.png")
    if magnitudes["step"]:
        adaptation_curves(magnitudes["step"], magnitudes["layers"], out / "adaptation_magnitude.png")
    write_samples(out / "samples.jsonl", after.pop("_main", after))  # chat and --data runs keep their lists under _main
    metrics = {
        **headline(after),
        "trainable_fraction": main_row["trainable_fraction"],
        "merge_max_abs_diff": gap,
        "full_ft": comparison or None,
        "accuracy_vs_full_ft": after["accuracy"] - comparison["accuracy"] if comparison else None,
        "rank_sweep": sweep,
        "adaptation_magnitude": magnitudes,
        "peak_memory_mb": main_row["peak_memory_mb"],
        "memory_measure": "peak tensor memory of two training steps beyond the weights (PyTorch profiler)",
        "train_examples": len(dataset),
        "train_tokens": dataset.tokens(),
        **encoded.counts,
        "run_time_s": time.perf_counter() - started,  # the whole run: evaluations, comparison and sweep included
    }
    return write_summary(out, "lora", cfg, metrics, baseline, model, result, unread=WORLD_KEYS if records else (),
                         adapter_dir=str(out / "adapter"), model_dir=str(out / "model"))
