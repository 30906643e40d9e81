"""Shared pieces of the side-by-side benchmarks: models, data, timing, and the side-by-side driver.

Each benchmark script runs every side in its own subprocess (so peak memory is that side's alone),
with the same model, data, batch and sequence length; warm-up steps are excluded and the median
step time is reported. Run a script with no arguments to get the table; `--rounds 2` runs the sides
in turn twice (a machine whose speed drifts then slows every side alike), `--sides a,b` a subset.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SIZES = ("tiny", "smollm2", "110m")
# The GPU size runs DESIGN.md's reference shapes (its H100 table): SFT rows of 1024 tokens, DPO sides of
# 512 tokens in batches of 8 pairs, GRPO 64 completions of 256 tokens, rollouts of 256 new tokens.
# smollm2 is the real pretrained LLM (posttrain:smollm2-135m) on the world's text as it is, on the CPU.
SEQ_LEN = {"tiny": None, "smollm2": None, "110m": 1024}  # None: the world's examples as they are (60-90 tokens)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(size: str):
    """(model, tokenizer): the embedded tiny model; SmolLM2-135M-Instruct with its chat template set aside
    (TRL reads a string prompt as raw text, posttrain would render it as a chat turn: both sides then see
    the same tokens); or a random-init ~110M Llama sharing the tiny model's tokenizer but with a 32k
    vocabulary (the reference figures' shape; token ids beyond the tokenizer's are unused)."""
    from posttrain.models import load_model

    if size == "smollm2":
        model, tokenizer = load_model("posttrain:smollm2-135m")
        tokenizer.chat_template = None
        return model.to(device()), tokenizer
    model, tokenizer = load_model("posttrain:tiny")
    if size == "110m":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.to(device()), tokenizer


def with_context(pairs: list[tuple[str, ...]], tokenizer, length: int) -> list[tuple[str, ...]]:
    """Each (prompt, completion, ...) tuple with worked examples of the world written before its prompt,
    as many as keep every prompt + completion within `length` tokens: long rows of the same world text.

    The context comes from the following pairs (prompt and first completion, a blank line after), so
    both sides see identical text; no row exceeds `length`, so neither side truncates."""
    from posttrain.data import encode_pair

    shots = [prompt + completion + "\n\n" for prompt, completion, *_ in pairs]
    shot_tokens = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in shots]

    def longest(prompt: str, completions) -> int:
        return max(len(encode_pair(tokenizer, prompt, c)[0]) for c in completions)

    out = []
    for i, (prompt, *completions) in enumerate(pairs):
        context, j = [], i + 1
        budget = length - longest(prompt, completions) - 8  # tokens may merge where two texts join
        while shot_tokens[j % len(shots)] <= budget:
            context.append(shots[j % len(shots)])
            budget -= shot_tokens[j % len(shots)]
            j += 1
        while context and longest("".join(context) + prompt, completions) > length:
            context.pop()
        out.append(("".join(context) + prompt, *completions))
    return out


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or this process's peak resident set on the CPU (MB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(step_fn, warmup: int, steps: int) -> list[float]:
    """Seconds per call of `step_fn`, warm-up calls excluded."""
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step_fn(i)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def trl_recomputation(side: str) -> dict:
    """TRL 1.x configs turn gradient checkpointing on by default: activations are dropped in the forward
    pass and recomputed in the backward pass (about a third more compute, much less activation memory).
    posttrain keeps its activations, so the `trl*` sides turn it off and both sides do the same work; the
    `trl-default` side keeps TRL's default, to show what it trades."""
    return {} if side == "trl-default" else {"gradient_checkpointing": False}


def trl_step_timer():
    """A TrainerCallback recording the seconds of every optimizer step in its `times` list."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def arguments(description: str, data: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options shared by the comparison and each side's process."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data", choices=data, default=data[0],
                        help="world: the world's examples as they are; mixed: 1-4 digit problems, direct and "
                             "worked, for rows of very different lengths (where the script offers it)")
    return parser


def side_main(run_side, data: tuple[str, ...]) -> None:
    """Entry point of one side's subprocess: prints one JSON line of its measurements."""
    parser = arguments("one side", data)
    parser.add_argument("--side", required=True)
    args = parser.parse_args()
    result = run_side(args)
    result.update(side=args.side, size=args.size, peak_mb=peak_memory_mb(),
                  median_s=statistics.median(result.pop("times")))
    print("RESULT " + json.dumps(result), flush=True)


def main(module: str, run_side, sides: list[str], unit: str, per_step: str, data: tuple[str, ...] = ("world",)) -> None:
    """`python -m benchmarks.X [--size ...]` compares the sides; with --side it is one side's process."""
    if "--side" in sys.argv:
        side_main(run_side, data)
    else:
        compare(module, sides, unit, per_step, data)


def compare(module: str, sides: list[str], unit: str, per_step: str, data: tuple[str, ...]) -> None:
    """Run each side in a subprocess and print a table with throughput ratios to the last side.

    With --rounds R the sides run in turn R times (A B C, A B C, ...), so a machine whose speed drifts
    slows every side alike; a side's step time is the median of its rounds, and each round's ratio is
    listed in the notes."""
    parser = arguments(f"posttrain vs others: {unit}", data)
    parser.add_argument("--rounds", type=int, default=1, help="times to run every side, in turn (default 1)")
    parser.add_argument("--sides", default=",".join(sides), help=f"comma-separated subset of {','.join(sides)}; "
                        "the last is the reference of the ratios")
    args = parser.parse_args()
    chosen = args.sides.split(",")
    if not chosen or any(side not in sides for side in chosen):
        parser.error(f"--sides must name some of {', '.join(sides)}")
    sides = chosen
    rounds = [[run_one(module, side, args) for side in sides] for _ in range(args.rounds)]
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"{unit}, size={args.size}, data={args.data}, device={where}, median of {args.steps} steps after "
          f"{args.warmup} warm-up, {args.rounds} round(s)")
    print(f"| side | {unit} | median step (ms) | peak memory (MB) | MFU | vs {sides[-1]} | notes |")
    print("|---|---|---|---|---|---|---|")
    rate = lambda r: r[per_step] / r["median_s"]  # noqa: E731
    known = {"side", "size", "peak_mb", "median_s", "flops_per_token", per_step}
    base = statistics.median(rate(results[-1]) for results in rounds)
    for i, side in enumerate(sides):
        runs = [results[i] for results in rounds]
        r = {**runs[0], "median_s": statistics.median(x["median_s"] for x in runs),
             "peak_mb": max(x["peak_mb"] for x in runs)}
        mfu = f"{100 * rate(r) * r['flops_per_token'] / H100_BF16_FLOPS:.1f}%" if "flops_per_token" in r else ""
        notes = [f"{k} {statistics.mean(x[k] for x in runs):.2f}" for k in r if k not in known]  # e.g. GRPO's sampling
        if args.rounds > 1:
            notes.append("rounds " + " / ".join(f"{rate(x) / rate(results[-1]):.2f}x" for x, results in zip(runs, rounds)))
        print(f"| {side} | {rate(r):,.1f} | {1000 * r['median_s']:.1f} | {r['peak_mb']:.0f} | {mfu} | "
              f"{rate(r) / base:.2f}x | {', '.join(notes)} |")


def run_one(module: str, side: str, args) -> dict:
    """One side's measurements, from its own subprocess."""
    cmd = [sys.executable, "-m", module, "--side", side, "--size", args.size, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--data", args.data]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"side {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM


def training_flops_per_token(model, seq_len: int) -> float:
    """6N + 6 L d T: weights' forward+backward plus attention scores, per token (the DESIGN.md formula)."""
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    return 6 * n + 6 * c.num_hidden_layers * c.hidden_size * seq_len
