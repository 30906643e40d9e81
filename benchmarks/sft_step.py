"""SFT training step: posttrain's loop vs TRL's SFTTrainer (tokens/s, peak memory, MFU on a GPU).

Same model, same prompt/completion examples (chain-of-thought 3-digit addition from the world,
or with --data mixed 1-4 digit problems direct and worked, rows of 10-110 tokens), completion-only
loss, AdamW, the same rows in every batch. posttrain runs them packed as `train()` does by default
(posttrain/packing.py: no layer but attention computes on padding); `posttrain-padded` without;
TRL pads; `trl-padding-free` is its padding_free=True (one row of every token, kept apart by
transformers' block-diagonal attention mask over the whole row, or flash-attention's varlen kernel
where installed). Tiny: batch 32 of the examples as they are
(~89 tokens). 110m: batch 16 of rows of up to 1024 tokens (worked examples written before each
prompt, `common.with_context`), DESIGN.md's reference length.

    python -m benchmarks.sft_step                 # embedded tiny model (CPU or GPU)
    python -m benchmarks.sft_step --data mixed    # rows of very different lengths
    python -m benchmarks.sft_step --size smollm2  # the real pretrained 135M LLM, batch 16 (CPU or GPU)
    python -m benchmarks.sft_step --size 110m     # random-init ~110M Llama, bf16 (GPU)
"""
from __future__ import annotations

import tempfile

import torch

from benchmarks.common import (SEQ_LEN, device, load, main, timed_steps, training_flops_per_token,
                               trl_recomputation, trl_step_timer, with_context)
from posttrain.data import EncodedDataset, encode_pair
from posttrain.forward import causal_lm_loss
from posttrain.methods.common import world_examples

BATCH = {"tiny": 32, "smollm2": 16, "110m": 16}


def examples(size: str, data: str, tokenizer) -> list[tuple[str, str]]:
    if data == "mixed":  # 1-4 digit addition, direct and worked: rows of 10-110 tokens, shuffled by the batches
        pairs = [p for digits in (1, 2, 3, 4) for fmt in ("direct", "cot")
                 for p in world_examples("add", digits, 256, fmt, seed=digits)]
    else:
        pairs = world_examples("add", 3, 2048 if SEQ_LEN[size] is None else 256, "cot", seed=0)
    return pairs if SEQ_LEN[size] is None else with_context(pairs, tokenizer, SEQ_LEN[size])


def run_posttrain(args) -> dict:
    from posttrain.training import (TrainingConfig, _optimizer_step, compiled_forward, forward_as, lr_lambda,
                                    make_accelerator, make_optimizer, prepare_for_losses)

    model, tokenizer = load(args.size)
    batch = BATCH[args.size]
    cfg = TrainingConfig(steps=args.warmup + args.steps, batch_size=batch, lr=1e-4,
                         packing=args.side != "posttrain-padded")
    accelerator = make_accelerator(cfg.precision)
    rows = [encode_pair(tokenizer, p, c) for p, c in examples(args.size, args.data, tokenizer)]
    data = EncodedDataset(rows, tokenizer.pad_token_id, batch, 0)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    prepare_for_losses(model, cfg)  # as train() does
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def step(i):
        _optimizer_step(model, optimizer, data.batch(i), causal_lm_loss, cfg, accelerator)
        scheduler.step()

    compiled = compiled_forward(model, args.side.endswith("-compiled"))  # as train() with compile=true
    with forward_as(model, compiled):
        times = timed_steps(step, args.warmup, args.steps)
    return measured(times, model, rows, batch)


def measured(times: list[float], model, rows: list, batch: int) -> dict:
    """Step times with the mean tokens per batch (real tokens, padding not counted) and, on a GPU, FLOPs."""
    mean_length = sum(len(ids) for ids, _ in rows) / len(rows)
    result = {"times": times, "tokens": batch * mean_length}
    if device() == "cuda":
        result["flops_per_token"] = training_flops_per_token(model, int(mean_length))
    return result


def run_trl(args) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load(args.size)
    pairs = examples(args.size, args.data, tokenizer)
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    timer = trl_step_timer()
    padding_free = args.side == "trl-padding-free"
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=BATCH[args.size],
                           max_steps=args.warmup + args.steps,
                           learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to=[],
                           completion_only_loss=True, packing=False, padding_free=padding_free,
                           dataset_num_proc=1, bf16=args.size == "110m",
                           use_cpu=device() == "cpu", disable_tqdm=True,
                           max_length=None if padding_free else 1024,  # no row is longer: nothing is truncated
                           **trl_recomputation(args.side))
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
        trainer.train()
    rows = [encode_pair(tokenizer, p, c) for p, c in pairs]
    return measured(timer.times[args.warmup:], model, rows, BATCH[args.size])


def run_side(args) -> dict:
    return {"posttrain": run_posttrain, "posttrain-padded": run_posttrain, "posttrain-compiled": run_posttrain,
            "trl-padding-free": run_trl, "trl-default": run_trl, "trl": run_trl}[args.side](args)


if __name__ == "__main__":
    main(__spec__.name, run_side,
         ["posttrain", "posttrain-padded", "posttrain-compiled", "trl-padding-free", "trl-default", "trl"],
         "tokens/s", "tokens",
         data=("world", "mixed"))
