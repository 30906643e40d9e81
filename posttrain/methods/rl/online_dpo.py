"""Online (iterative) DPO: DPO on pairs of the current policy's own samples, resampled every round (Xiong et al.
2024, "Iterative Preference Learning from Human Feedback"; Guo et al. 2024, "Direct Language Model Alignment from
Online AI Feedback"; TRL's OnlineDPOTrainer).

    for each round r = 1..rounds:
        P fresh training prompts, G samples each from the current policy; the verifier labels them 1/0
        pairs: each prompt's distinct right and distinct wrong samples zipped, at most pairs_per_prompt of them,
               none from a group whose samples all agree                                  (dpo.group_pairs)
        ref log-probs of the pairs from the start policy, which stays the reference throughout
        `steps` DPO steps on the round's pairs: loss = DPO_LOSSES[loss_type] + rpo_alpha * NLL(chosen)
        held-out greedy accuracy and KL to the start policy: one point of the reward-KL frontier

Offline DPO (`posttrain dpo`) draws its pairs once, from the start policy; as training moves the policy, those
pairs describe a policy it no longer is. Online DPO spends the same sampling budget in rounds, each round's pairs
drawn from the policy as it is then, so the pairs stay where the policy puts its probability. The comparison at
equal samples (R rounds of P prompts x G samples, S steps each):

    posttrain online-dpo rounds=R prompts_per_round=P num_generations=G steps=S
    posttrain dpo pair_prompts=R*P samples_per_prompt=G steps=R*S          # the same samples, drawn once

Both write the completions they sampled (`samples_drawn` here, `completions_sampled` in DPO's summary), and both
draw their points on the same reward-KL frontier (reward_kl_frontier.png). The defaults are the equal-budget pair
of DPO's: 4 rounds of 64 prompts x 8 samples, 3 steps each, against DPO's 256 x 8 samples and 12 steps.

Departures: TRL's trainer samples two completions per prompt at every optimizer step and ranks them with a judge or
reward model; here a round samples G per prompt and trains `steps` steps on their pairs (Xiong et al.'s batched
iterative form; rounds of one step are TRL's fully online schedule), and the verifier labels them. Each round is a
call of the shared training loop (its own AdamW state and warmup). As in `posttrain dpo`, the chosen completions'
NLL stays in the loss by default (RPO, Pang et al. 2024: rpo_alpha), against the likelihood displacement that few
pairs show.

With `--data` (prompt/answer records, as GRPO reads them), the prompts are the user's, a seeded tenth held out for
the accuracy, and the verifier reads the completion's answer by convention (world/answers.py).

    posttrain online-dpo --output-dir runs/online-dpo
    posttrain online-dpo loss_type=ipo beta=0.5
    posttrain online-dpo --model ./my-policy --data prompts.jsonl max_new_tokens=512
"""
from __future__ import annotations

import dataclasses
import functools

from posttrain.config import Range, check_choice, check_ranges
from posttrain.losses.dpo import DPO_LOSSES
from posttrain.methods.common import policy_path, prepare_output
from posttrain.methods.rl.dpo import all_pair_logps, dpo_loss_fn, group_pairs, pair_batches, pair_tensors
from posttrain.methods.rl.expert_iteration import finish, refuse_resume, round_prompts, run_rounds, verifier
from posttrain.models import load_model
from posttrain.records import read_prompts
from posttrain.training import TrainingConfig, TrainResult, row_count, train

LOSS_TYPES = ("sigmoid", "ipo")  # TRL's OnlineDPOConfig.loss_type choices (losses/dpo.py)
TRAIN_METRICS = ("loss", "rewards/", "logps/")  # of a round's last DPO step, in its metrics.jsonl line


@dataclasses.dataclass
class OnlineDPOConfig(TrainingConfig):
    model: str = "sft-policy"  # starting policy and reference: sft-policy (shared CoT SFT model), a folder or hub id
    data: str | None = None  # JSONL of prompt/answer records (a tenth held out); default: world addition problems
    output_dir: str = "runs/online-dpo"  # where summary.json, metrics.jsonl, plots and the model go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    max_new_tokens: int | None = None  # completion budget (default: the longest world solution + 8; 256 with data)
    prompt_field: str = "prompt"  # the --data field holding the prompt (GSM8K: question)
    answer_field: str = "answer"  # the --data field holding the reference answer
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo
    beta: float = 0.1  # strength of the pull toward the reference
    rpo_alpha: float = 1.0  # weight of the chosen completions' NLL added to the loss (RPO; 0: plain DPO)
    rounds: int = 4  # sample -> pair -> DPO rounds
    prompts_per_round: int = 64  # fresh training prompts sampled in each round
    num_generations: int = 8  # completions sampled per prompt
    pairs_per_prompt: int = 2  # at most this many (right, wrong) pairs per prompt
    temperature: float = 1.0  # sampling temperature
    eval_problems: int = 300  # held-out test problems for accuracy
    kl_problems: int = 100  # held-out prompts whose samples measure KL to the reference
    steps: int = 3  # DPO steps per round
    batch_size: int = 32  # pairs per step
    lr: float = 5e-5
    warmup_steps: int = 1  # per round
    log_every: int = 1

    def validate(self) -> None:
        super().validate()
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_ranges(self, ONLINE_RANGES)


ONLINE_RANGES = {"beta": Range(0.0, low_open=True), "rpo_alpha": Range(0.0), "rounds": Range(1),
                 "prompts_per_round": Range(1), "num_generations": Range(2), "pairs_per_prompt": Range(1),
                 "temperature": Range(0.0, low_open=True)}

CONFIG = OnlineDPOConfig
# --quick: the smoke-sized twin policy on 2-digit addition, sampled cooler: at temperature 1 few of its samples are
# right, many of those by wrong steps (expert_iteration's docstring).
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "rounds": 2, "prompts_per_round": 64, "steps": 3,
         "temperature": 0.5, "eval_problems": 100, "kl_problems": 32}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's OnlineDPOConfig learning rate.
LARGE_MODEL = {"lr": 5e-7}


def dpo_round(model, reference, tokenizer, pairs: list, cfg: OnlineDPOConfig, folder, round_index: int) -> TrainResult:
    """`cfg.steps` DPO steps on one round's pairs against the reference's log-probs of them, computed once."""
    tensors = pair_tensors(pairs, tokenizer.pad_token_id)  # (P, 2, T): chosen at [:, 0], rejected at [:, 1]
    tensors["ref_logps"] = all_pair_logps(reference, tensors)  # (P, 2)
    loss_fn = dpo_loss_fn(functools.partial(DPO_LOSSES[cfg.loss_type], beta=cfg.beta), cfg.beta, cfg.rpo_alpha)
    return train(model, pair_batches(tensors, cfg.batch_size, cfg.seed + round_index), loss_fn, cfg, folder,
                 desc=f"online dpo round {round_index + 1}", averages_over=row_count)


def run(cfg: OnlineDPOConfig, resume: bool = False) -> dict:
    refuse_resume(resume, "online-dpo")
    records = read_prompts(cfg.data, cfg.prompt_field, cfg.answer_field) if cfg.data else None  # bad data fails first
    out = prepare_output(cfg.output_dir, resume)
    start_path = policy_path(cfg.model)
    model, tokenizer = load_model(start_path)
    reference = load_model(start_path)[0].requires_grad_(False)  # the start policy, fixed
    held_out, prompts, answers = round_prompts(cfg, records, tokenizer, start_path)
    baseline = held_out.measure(model, tokenizer, kl=False)

    def train_round(rollouts, folder, round_index: int) -> tuple[dict, TrainResult | None]:
        pairs = group_pairs(rollouts, cfg.num_generations, cfg.pairs_per_prompt)
        result = dpo_round(model, reference, tokenizer, pairs, cfg, folder, round_index) if pairs else None
        trained = {k: v for k, v in result.final_metrics.items() if k.startswith(TRAIN_METRICS)} if result else {}
        return {"pairs": len(pairs), **trained}, result

    lines, after, timing = run_rounds(cfg, out, model, tokenizer, reference, held_out, prompts, answers,
                                      verifier(records, tokenizer), train_round)
    last_trained = next((line for line in reversed(lines) if line["pairs"]), {})  # DPO's rewards/ and logps/ keys
    metrics = {**{k: v for k, v in last_trained.items() if k.startswith(("rewards/", "logps/"))},
               "pairs": sum(line["pairs"] for line in lines), "sampled_accuracy": lines[0]["sampled_accuracy"],
               "completions_sampled": sum(line["samples"] for line in lines)}  # DPO's name of samples_drawn
    return finish(out, "online-dpo", f"Online DPO ({cfg.loss_type}, beta={cfg.beta})", cfg, model, tokenizer,
                  start_path, baseline, after, lines, timing, metrics)
