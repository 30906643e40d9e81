"""Memory per rank of two-process full fine-tuning, DDP vs FSDP2 (`sharding=ddp|fsdp`, posttrain/sharding.py).

A Llama of about 23M parameters built from a config (random weights) takes a few SFT steps on random tokens on
two CPU processes (gloo), sharded as `training.train` shards it (`shard_for_training`, `make_optimizer`,
`prepare_trained`). Each rank counts the bytes it holds of the trained state from its local tensors (a DTensor's
local shard): the weights, the gradients after the backward pass, and AdamW's state after the step; and its
resident memory (VmRSS) after the steps and its peak (ru_maxrss). RSS includes torch itself, the activations
and, at its peak, the whole model each rank builds before sharding (and under FSDP the copy it shards), so the
counted bytes are the figure to compare with docs/SCALING.md's arithmetic. The ranks run with a fixed glibc
mmap threshold, so the tensors they free leave the RSS. Run by hand, not in the test suite:

    python -m benchmarks.fsdp_memory            # both shardings, a table
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

MB = 2**20


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kb / 1024


def worker(sharding: str, steps: int) -> None:
    """One rank: shard as training.train does, take `steps` SFT steps, print its counts as one JSON line."""
    from posttrain.forward import causal_lm_loss
    from posttrain.training import (TrainingConfig, make_accelerator, make_optimizer, prepare_trained,
                                    shard_for_training)

    cfg = TrainingConfig(sharding=sharding, precision="fp32")
    accelerator = make_accelerator(cfg.precision)
    home = build_model()
    params = sum(p.numel() for p in home.parameters())
    model = shard_for_training(home, cfg, accelerator)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    model, optimizer = prepare_trained(accelerator, model, optimizer)
    generator = torch.Generator().manual_seed(accelerator.process_index)
    counts = {}
    for _ in range(steps):
        ids = torch.randint(0, 8192, (4, 128), generator=generator)
        loss, _ = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        accelerator.backward(loss)
        counts["grads"] = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    counts["weights"] = local_bytes(model.parameters())
    counts["adamw"] = local_bytes(v for state in optimizer.state.values() for v in state.values()
                                  if torch.is_tensor(v) and v.dim() > 0)
    row = {"sharding": sharding, "rank": accelerator.process_index, "params": params,
           **{k: v / MB for k, v in counts.items()}, "rss_mb": rss_mb(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("RESULT " + json.dumps(row), flush=True)
    torch.distributed.destroy_process_group()


def launch(sharding: str, steps: int) -> list[dict]:
    # a fixed mmap threshold: glibc's moving one serves large tensors from the heap after the first frees, and
    # memory freed there (the whole model each rank builds before sharding) stays in the RSS
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "benchmarks.fsdp_memory", "--worker", sharding, "--steps", str(steps)],
                         capture_output=True, text=True, env=env)
    if ran.returncode:
        sys.exit(ran.stderr[-3000:])
    return sorted((json.loads(line[len("RESULT "):]) for line in ran.stdout.splitlines()
                   if line.startswith("RESULT ")), key=lambda row: row["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    rows = [row for sharding in ("ddp", "fsdp") for row in launch(sharding, args.steps)]
    print(f"{rows[0]['params'] / 1e6:.1f}M parameters, 2 processes, {args.steps} SFT steps of 4 x 128 tokens a rank")
    print("| sharding | rank | weights MB | grads MB | AdamW MB | sum MB | RSS after MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        total = row["weights"] + row["grads"] + row["adamw"]
        print(f"| {row['sharding']} | {row['rank']} | {row['weights']:.1f} | {row['grads']:.1f} | {row['adamw']:.1f} "
              f"| {total:.1f} | {row['rss_mb']:.0f} | {row['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
