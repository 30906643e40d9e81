"""Memory of the vocabulary-sized logits: a loss step with them whole vs built in chunks (`loss_logits_mb`).

One step of the SFT loss (`--data sft`, `causal_lm_loss`) or of DPO's summed log-probs (`--data dpo`,
`sequence_logprobs`), forward and backward, on 16 rows of 1,024 tokens, every token labelled, with a
Llama of 2 layers of width 128 and a 32k vocabulary (float32): the whole logits are 16,368 x 32,000 x
4 B = 2 GB, as much again for their gradient. Sides: no limit, and budgets of 1,024 MB (the default:
two chunks) and 256 MB (eight). Peak memory is each side's own process (resident set on the CPU, CUDA
allocations on a GPU). The model is small on purpose: the output layer is what is measured.

    python -m benchmarks.logits_memory --warmup 1 --steps 3              # the SFT loss
    python -m benchmarks.logits_memory --warmup 1 --steps 3 --data dpo   # DPO's sequence log-probs
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import device, main, timed_steps
from posttrain.forward import budget_logits, causal_lm_loss
from posttrain.generation import sequence_logprobs

ROWS, LENGTH, VOCAB = 16, 1024, 32_000
BUDGETS = {"whole": 0.0, "chunks-1024mb": 1024.0, "chunks-256mb": 256.0}  # loss_logits_mb of each side


def run_side(args) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * LENGTH)
    model = LlamaForCausalLM(config).to(device())
    budget_logits(model, BUDGETS[args.side])
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), device=device())
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step(_):
        loss = causal_lm_loss(model, batch)[0] if args.data == "sft" else -sequence_logprobs(model, batch).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return {"times": timed_steps(step, args.warmup, args.steps), "tokens": ROWS * LENGTH}


if __name__ == "__main__":
    main(__spec__.name, run_side, list(BUDGETS), "tokens/s", "tokens", data=("sft", "dpo"))
