"""DPO training step: posttrain's loop vs TRL's DPOTrainer (pairs/s, peak memory).

Same model, same pairs (4-digit chain-of-thought addition from the world: chosen = the reference
solution, rejected = the solution of a problem with one operand digit misread, the policy's usual
mistake), sigmoid loss, beta 0.1, AdamW. Tiny: batch 16 pairs as they are (~110 tokens a side).
110m: batch 8 pairs of up to 512 tokens a side (worked examples before each prompt), DESIGN.md's
reference shape. Both sides precompute the reference log-probs before the timed steps (TRL:
precompute_ref_log_probs=True); posttrain runs chosen and rejected through one forward, packed as
`train()` does by default (the posttrain-padded side without).

    python -m benchmarks.dpo_step                 # embedded tiny model (CPU or GPU)
    python -m benchmarks.dpo_step --size 110m     # random-init ~110M Llama, bf16 (GPU)
"""
from __future__ import annotations

import random
import tempfile


from benchmarks.common import (SEQ_LEN, device, load, main, timed_steps, trl_recomputation, trl_step_timer,
                               with_context)
from posttrain.data import encode_pair
from posttrain.world import MAIN_SKILL, render, sample_problems
from posttrain.world.skills import Problem

BATCH = {"tiny": 16, "smollm2": 8, "110m": 8}  # pairs per step


def misread(problem: Problem, rng: random.Random) -> Problem:
    """The problem with one digit of the first operand changed."""
    a, b = problem.operands
    digits = list(str(a))
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "123456789" if d != digits[i]])
    return Problem(problem.skill, (int("".join(digits)), b), problem.difficulty)


def pairs(size: str, tokenizer) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples; at 110m, each side up to 512 tokens (half the SFT length)."""
    rng = random.Random(0)
    out = []
    for problem in sample_problems(MAIN_SKILL, 4, 512 if SEQ_LEN[size] is None else 128, "train", seed=0):
        prompt, chosen = render(problem, "cot")
        out.append((prompt, chosen, render(misread(problem, rng), "cot")[1]))
    return out if SEQ_LEN[size] is None else with_context(out, tokenizer, SEQ_LEN[size] // 2)


def run_posttrain(args) -> dict:
    from posttrain.losses.dpo import dpo_sigmoid
    from posttrain.methods.rl.dpo import all_pair_logps, dpo_loss_fn, pair_batches, pair_tensors
    from posttrain.training import (TrainingConfig, _optimizer_step, compiled_forward, forward_as, make_accelerator,
                                    make_optimizer, prepare_for_losses, row_count)

    model, tokenizer = load(args.size)
    encoded = [(encode_pair(tokenizer, p, c), encode_pair(tokenizer, p, r)) for p, c, r in pairs(args.size, tokenizer)]
    tensors = pair_tensors(encoded, tokenizer.pad_token_id)
    tensors = {k: v.to(device()) for k, v in tensors.items()}
    tensors["ref_logps"] = all_pair_logps(model, tensors)  # before timing, as TRL's precompute
    cfg = TrainingConfig(steps=args.warmup + args.steps, batch_size=BATCH[args.size], lr=1e-6,
                         packing=args.side != "posttrain-padded")
    accelerator = make_accelerator(cfg.precision)
    optimizer = make_optimizer(model.parameters(), cfg)
    prepare_for_losses(model, cfg)  # as train() does
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    loss_fn = dpo_loss_fn(lambda p: dpo_sigmoid(p, 0.1), 0.1, 0.0)
    batch = pair_batches(tensors, BATCH[args.size], 0)
    step = lambda i: _optimizer_step(model, optimizer, batch(i), loss_fn, cfg, accelerator, row_count)  # noqa: E731
    compiled = compiled_forward(model, args.side.endswith("-compiled"))  # as train() with compile=true
    with forward_as(model, compiled):
        times = timed_steps(step, args.warmup, args.steps)
    return {"times": times, "pairs": BATCH[args.size]}


def run_trl(args) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load(args.size)

    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs(args.size, tokenizer)])
    timer = trl_step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=BATCH[args.size],
                           max_steps=args.warmup + args.steps,
                           learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                           logging_steps=10**6, save_strategy="no", report_to=[], dataset_num_proc=1,
                           bf16=args.size == "110m", use_cpu=device() == "cpu", disable_tqdm=True, max_length=1024,
                           **trl_recomputation(args.side))
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
        trainer.train()
    return {"times": timer.times[args.warmup:], "pairs": BATCH[args.size]}


def run_side(args) -> dict:
    return {"posttrain": run_posttrain, "posttrain-padded": run_posttrain, "posttrain-compiled": run_posttrain,
            "trl-default": run_trl, "trl": run_trl}[args.side](args)


if __name__ == "__main__":
    main(__spec__.name, run_side, ["posttrain", "posttrain-padded", "posttrain-compiled", "trl-default", "trl"],
         "pairs/s", "pairs")
