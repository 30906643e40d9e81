"""Rollout generation: posttrain's sampler vs `model.generate` (new tokens/s).

Every side samples (temperature 1) exactly 256 new tokens (48 on smollm2) for each of BATCH prompts of world
questions: posttrain's sampler ignores EOS here, `generate` gets min_new_tokens. Sides: posttrain
(its default dynamic cache), posttrain-compiled (`decode="compiled"`: a static cache and the decode
step compiled, one CUDA graph a token on a GPU), HF generate with cache_implementation="static"
(which `generate` compiles on a GPU) and HF generate with the dynamic cache. Warm-up steps include
the compiling.

    python -m benchmarks.generation                       # tiny model, batch 64
    python -m benchmarks.generation --size smollm2        # the real pretrained 135M LLM, 48 new tokens
    BENCH_BATCH=256 python -m benchmarks.generation --size 110m
"""
from __future__ import annotations

import os

import torch

from benchmarks.common import device, load, main, timed_steps
from posttrain.generation import generate
from posttrain.world import render, sample_problems

BATCH = int(os.environ.get("BENCH_BATCH", "64"))
NEW_TOKENS = {"smollm2": 48}  # a real 135M model on the CPU: a short reply's length; other sizes 256


class NeverStops:
    """The tokenizer, with an end-of-sequence id no sampled token can have: every row runs to the end."""

    eos_token_id = -1

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def prompts() -> list[str]:
    return [render(p, "cot")[0] for p in sample_problems("add", 3, BATCH, "test", seed=0)]


def run_side(args) -> dict:
    model, tokenizer = load(args.size)
    model.eval()
    texts, new_tokens = prompts(), NEW_TOKENS.get(args.size, 256)
    if args.side.startswith("posttrain"):
        never, decode = NeverStops(tokenizer), "compiled" if args.side.endswith("-compiled") else "dynamic"
        step = lambda i: generate(model, never, texts, max_new_tokens=new_tokens, temperature=1.0,  # noqa: E731
                                  seed=i, batch_size=BATCH, decode=decode)
    else:
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, return_tensors="pt", padding=True).to(device())
        extra = {"cache_implementation": "static"} if args.side == "hf-static" else {}

        @torch.no_grad()
        def step(i):
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                           temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id, **extra)
    return {"times": timed_steps(step, args.warmup, args.steps), "new_tokens": BATCH * new_tokens}


if __name__ == "__main__":
    main(__spec__.name, run_side, ["posttrain", "posttrain-compiled", "hf-static", "hf-dynamic"], f"new tokens/s (batch {BATCH})",
         "new_tokens")
