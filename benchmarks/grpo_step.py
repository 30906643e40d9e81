"""GRPO step, rollouts included: posttrain vs TRL's GRPOTrainer without vLLM (completions/s).

Same model, same prompts (4-digit chain-of-thought addition), 8 prompts x 8 completions per step,
temperature 1, the same completion budget, the world's verifier as the reward, beta 0 (no reference
model on either side), one optimizer step per batch of rollouts. The completion budget is the
world's CoT length on the tiny model and 256 tokens at 110m (DESIGN.md's reference shape; a
random-init model rarely samples EOS, so its completions run to the budget). A step is: sample,
score, compute advantages, update. posttrain also reports the share of its step spent sampling.
The posttrain-compiled side is what `compile=true` gives a GRPO run: the decode step compiled over a
static cache (`generate(decode="compiled")`) and the update's forward compiled; warm-up steps
include the compiling. posttrain updates on packed rollouts (`packing=true`, the default: no layer
but attention computes on padding); the posttrain-padded side without.

    python -m benchmarks.grpo_step                 # embedded tiny model (CPU or GPU)
    python -m benchmarks.grpo_step --size smollm2  # the real pretrained 135M LLM (CPU or GPU)
    python -m benchmarks.grpo_step --size 110m     # random-init ~110M Llama, bf16 (GPU)
"""
from __future__ import annotations

import tempfile
import time

import torch

from benchmarks.common import (SEQ_LEN, device, load, main, sync, timed_steps, trl_recomputation,
                               trl_step_timer)
from posttrain.evaluation import max_new_tokens_for
from posttrain.world import MAIN_SKILL, render, sample_problems, verify

PROMPTS, GROUP = 8, 8


def problems(n: int = 256):
    return sample_problems(MAIN_SKILL, 4, n, "train", seed=0)


def completion_budget(size: str, tokenizer, todo) -> int:
    return max_new_tokens_for(tokenizer, todo) if SEQ_LEN[size] is None else 256


def run_posttrain(args) -> dict:
    from posttrain.methods.rl.grpo import GRPOConfig, optimise
    from posttrain.rollouts import cot_prompts, sample_rollouts
    from posttrain.training import (compiled_forward, forward_as, lr_lambda, make_accelerator, make_optimizer,
                                    prepare_for_losses)

    model, tokenizer = load(args.size)
    todo = problems()
    budget = completion_budget(args.size, tokenizer, todo)
    cfg = GRPOConfig(prompts_per_step=PROMPTS, num_generations=GROUP, batch_size=PROMPTS * GROUP, beta=0.0,
                     steps=args.warmup + args.steps, lr=1e-6, compile=args.side.endswith("-compiled"),
                     packing=args.side != "posttrain-padded")
    accelerator = make_accelerator(cfg.precision)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    prepare_for_losses(model, cfg)  # as the GRPO run does
    model, optimizer = accelerator.prepare(model, optimizer)
    compiled = compiled_forward(model, cfg.compile)
    sampling: list[float] = []

    def step(i):
        start = time.perf_counter()
        batch = todo[i * PROMPTS : (i + 1) * PROMPTS]
        rollouts = sample_rollouts(model, tokenizer, *cot_prompts(batch), num_samples=GROUP, max_new_tokens=budget,
                                   temperature=1.0, seed=i, decode=cfg.rollout_decode)
        sync()
        sampling.append(time.perf_counter() - start)
        model.train()
        with forward_as(model, compiled):
            optimise(model, None, optimizer, scheduler, accelerator, rollouts, cfg)

    times = timed_steps(step, args.warmup, args.steps)
    return {"times": times, "completions": PROMPTS * GROUP,
            "sampling_share": sum(sampling[args.warmup:]) / sum(times)}


def run_trl(args) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load(args.size)
    todo = problems()

    def reward(prompts, completions, answer, **_):
        return [verify(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    data = Dataset.from_list([{"prompt": render(p, "cot")[0], "answer": p.answer} for p in todo])
    timer = trl_step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(output_dir=tmp, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                            max_completion_length=completion_budget(args.size, tokenizer, todo), temperature=1.0,
                            beta=0.0,
                            max_steps=args.warmup + args.steps, learning_rate=1e-6, logging_steps=10**6,
                            save_strategy="no", report_to=[], bf16=args.size == "110m", use_cpu=device() == "cpu",
                            disable_tqdm=True, shuffle_dataset=False, **trl_recomputation(args.side))
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return {"times": timer.times[args.warmup:], "completions": PROMPTS * GROUP}


def run_side(args) -> dict:
    return {"posttrain": run_posttrain, "posttrain-padded": run_posttrain, "posttrain-compiled": run_posttrain,
            "trl-default": run_trl, "trl": run_trl}[args.side](args)


if __name__ == "__main__":
    main(__spec__.name, run_side, ["posttrain", "posttrain-padded", "posttrain-compiled", "trl-default", "trl"],
         "completions/s",
         "completions")
