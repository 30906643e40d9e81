"""One GRPO update (token and sequence aggregation) and one PPO update on a fixed rollout batch, run as
`python tests/rl_update_script.py MODEL OUT_DIR` on one process or under torchrun, where each rank updates
on its share of the prompts. SGD at lr 1 makes the weights' change minus the gradient, so
tests/test_distributed.py compares gradients through the saved weights. Prompt 0's completions are
short and prompt 1's long: the ranks' shares hold different numbers of completion tokens, which a
per-rank token mean would weigh wrongly.
"""
import sys
from functools import partial

import torch
from safetensors.torch import save_file

from posttrain.cli import leave_process_group
from posttrain.data import encode_pair, pad_batch
from posttrain.models import load_model
from posttrain.rollouts import Rollouts, rank_share
from posttrain.training import make_accelerator, prepare_for_losses

GROUPS = [  # (prompt, completions, rewards): one GRPO group each
    ("Q: 2+3\n", ["A: 5", "A: 6", "A: 5", "A: 7"], [1.0, 0.0, 1.0, 0.0]),
    ("Q: 14+27\n", ["4+7+0=11, digits 1, carry 1\n1+2+1=4\nA: 41", "A: 31", "1+2=3\nA: 311",
                    "4+7=11, so 1 carry 1\n1+2+1=4, so 4\nA: 41"], [1.0, 0.0, 0.0, 1.0]),
]


def rollouts_of(groups, tokenizer) -> Rollouts:
    rows = [(prompt, completion, reward) for prompt, completions, rewards in groups
            for completion, reward in zip(completions, rewards)]
    batch = pad_batch([encode_pair(tokenizer, p, c) for p, c, _ in rows], tokenizer.pad_token_id)
    return Rollouts(prompts=[p for p, _, _ in rows], texts=[c for _, c, _ in rows],
                    rewards=torch.tensor([r for _, _, r in rows]), batch=batch, stopped=[True] * len(rows))


def grpo_update(model, tokenizer, accelerator, model_dir: str, aggregation: str = "token", grad_accum: int = 1) -> dict:
    from posttrain.methods.rl.grpo import GRPOConfig, optimise

    cfg = GRPOConfig(num_generations=4, batch_size=8, beta=0.0, max_grad_norm=0.0, loss_aggregation=aggregation,
                     grad_accum=grad_accum)
    prepare_for_losses(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    rollouts = rollouts_of(rank_share(GROUPS, accelerator), tokenizer)
    optimise(model, None, optimizer, constant(optimizer), accelerator, rollouts, cfg)
    return accelerator.unwrap_model(model).state_dict()


def ppo_update(model, tokenizer, accelerator, model_dir: str) -> dict:
    from posttrain.methods.rl.ppo import PPOConfig, ValueHead, optimise

    cfg = PPOConfig(samples_per_prompt=4, epochs=1, batch_size=8, max_grad_norm=0.0)
    reference = load_model(model_dir)[0].requires_grad_(False)
    head = ValueHead(model.config.hidden_size)
    prepare_for_losses(model, cfg, reference)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=1.0)
    model, head, optimizer = accelerator.prepare(model, head, optimizer)
    rollouts = rollouts_of(rank_share(GROUPS, accelerator), tokenizer)
    optimise(model, head, reference, optimizer, constant(optimizer), accelerator, rollouts, cfg)
    head_weights = {f"value_head.{k}": v for k, v in accelerator.unwrap_model(head).state_dict().items()}
    return {**accelerator.unwrap_model(model).state_dict(), **head_weights}


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


UPDATES = {"grpo": grpo_update, "grpo-sequence": partial(grpo_update, aggregation="sequence"), "ppo": ppo_update}


def main(model_dir: str, out_dir: str) -> None:
    accelerator = make_accelerator("fp32")
    for method, update in UPDATES.items():  # each from the same start: the weights in model_dir
        model, tokenizer = load_model(model_dir)
        weights = update(model, tokenizer, accelerator, model_dir)
        if accelerator.is_main_process:
            save_file({k: v.detach().clone() for k, v in weights.items()}, f"{out_dir}/{method}.safetensors")
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
