"""Expert iteration: fine-tuning on the policy's own verified samples, round after round (STaR, Zelikman et al.
2022; rejection-sampling fine-tuning, Yuan et al. 2023; ReST-EM, Singh et al. 2023).

    for each round r = 1..rounds:
        P fresh training prompts, G samples each from the current policy (one shared prefill per prompt)
        keep the samples the verifier marks right (reward 1) that ended with EOS, one per distinct text,
            at most `max_per_prompt` of a prompt (0: all)                                      (verified_rows)
        `steps` SFT steps on them: loss = -1/N sum_t log pi(y_t | x, y_<t) over completion tokens, EOS included
        held-out greedy accuracy and KL to the start policy: one point of the round

ReST-EM reads this as expectation-maximisation: sampling and keeping what a binary reward accepts is an
approximate E-step, SFT on what was kept the M-step. It is also a policy gradient with a 0/1 reward that only
ever pulls toward the right samples: GRPO's group baseline adds the push away from the wrong ones, which is
what this method measures itself against. The start is the shared chain-of-thought SFT policy, as for GRPO:
its right samples are the carries it gets right at temperature 1 and misses greedily.

Departures from the papers: STaR and ReST-EM fine-tune the original model afresh each iteration on the newest
samples; here each round continues from the current policy (cheaper, and what a few short rounds on a small
model need), each round a call of the shared training loop (training.train: its own AdamW state and warmup).
STaR's rationalisation (re-asking a failed problem with its answer as a hint) is left out: a prompt with no
right sample teaches nothing. The verifier reads the answer alone, so a sample that reaches the right answer by wrong
steps is kept too (STaR's false positives); from a policy whose samples are mostly wrong such lucky ones are a
large share of what is kept, and fine-tuning on them teaches the wrong steps: sample cooler there. The kept rows are the sampled token ids themselves (Rollouts.row, laid out as
data.encode_pair lays out a demonstration), not their text re-encoded.

Samples against GRPO: a run draws rounds x prompts_per_round x num_generations completions (`samples_drawn` in
summary.json); GRPO draws steps x prompts_per_step x num_generations (its `completions_sampled`). The defaults
draw GRPO's: 3 x 240 x 8 = 45 x 16 x 8 = 5,760 completions.

With `--data` (prompt/answer records, as GRPO reads them), the prompts are the user's, a seeded tenth held out
for the accuracy, and the verifier reads the completion's answer by convention (world/answers.py); a chat
model's replies are read the same way.

    posttrain expert-iteration --output-dir runs/expert-iteration
    posttrain expert-iteration rounds=5 max_per_prompt=1          # STaR keeps one rationale per problem
    posttrain expert-iteration --model ./my-policy --data prompts.jsonl max_new_tokens=512
"""
from __future__ import annotations

import dataclasses
import time

from posttrain.config import Range, check_ranges
from posttrain.data import EncodedDataset, has_chat_template
from posttrain.errors import UserError
from posttrain.forward import causal_lm_loss
from posttrain.heldout import HeldOut, run_prompts
from posttrain.io import JsonlWriter
from posttrain.methods.common import (headline, is_main_process, policy_path, prepare_output, save_policy,
                                      write_samples, write_summary)
from posttrain.methods.rl.dpo import frontier_points
from posttrain.models import load_model
from posttrain.records import read_prompts
from posttrain.report.plots import training_curve
from posttrain.report.rl_plots import draw_frontier
from posttrain.rollouts import Rollouts, reward_function, sample_rollouts
from posttrain.training import TrainingConfig, TrainResult, train
from posttrain.world.answers import answer_rewards


@dataclasses.dataclass
class ExpertIterationConfig(TrainingConfig):
    model: str = "sft-policy"  # starting policy: sft-policy (shared CoT SFT model), a model folder or hub id
    data: str | None = None  # JSONL of prompt/answer records (a tenth held out); default: world addition problems
    output_dir: str = "runs/expert-iteration"  # where summary.json, metrics.jsonl, plots and the model go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    max_new_tokens: int | None = None  # completion budget (default: the longest world solution + 8; 256 with data)
    prompt_field: str = "prompt"  # the --data field holding the prompt (GSM8K: question)
    answer_field: str = "answer"  # the --data field holding the reference answer
    rounds: int = 3  # sample -> filter -> fine-tune rounds
    prompts_per_round: int = 240  # fresh training prompts sampled in each round (GRPO's samples: docstring)
    num_generations: int = 8  # completions sampled per prompt
    temperature: float = 1.0  # sampling temperature
    max_per_prompt: int = 0  # keep at most this many distinct right completions of a prompt (0: all)
    eval_problems: int = 300  # held-out test problems for accuracy
    kl_problems: int = 100  # held-out prompts whose samples measure KL to the start policy
    steps: int = 30  # SFT steps per round
    batch_size: int = 32  # completions per SFT step
    lr: float = 1e-4
    warmup_steps: int = 3  # per round
    min_lr_ratio: float = 1.0  # constant learning rate after warmup
    log_every: int = 5

    def validate(self) -> None:
        super().validate()
        check_ranges(self, ROUND_RANGES)


ROUND_RANGES = {"rounds": Range(1), "prompts_per_round": Range(1), "num_generations": Range(1),
                "max_per_prompt": Range(0), "temperature": Range(0.0, low_open=True)}

CONFIG = ExpertIterationConfig
# --quick: the smoke-sized twin policy on 2-digit addition. Its samples at temperature 1 are mostly wrong, and
# many of its right ones reach the answer by wrong steps (the docstring's false positives): it samples cooler.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "rounds": 2, "prompts_per_round": 64, "steps": 10,
         "temperature": 0.5, "lr": 5e-5, "eval_problems": 100, "kl_problems": 32}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's SFTConfig learning rate.
LARGE_MODEL = {"lr": 2e-5}


def refuse_resume(resume: bool, method: str) -> None:
    """A run of rounds restarts: it keeps no checkpoint between rounds to continue from."""
    if resume:
        raise UserError(f"{method} cannot continue an interrupted run (its rounds keep no checkpoint); run it again "
                        "without --resume, into a new --output-dir")


def round_prompts(cfg, records: list | None, tokenizer, start_path: str) -> tuple[HeldOut, list[str], list[str]]:
    """GRPO's held-out measurement and training prompts (heldout.run_prompts), rounds x prompts_per_round of them:
    a round takes its prompts as a GRPO step does."""
    plan = dataclasses.replace(cfg, steps=cfg.rounds)
    plan.prompts_per_step = cfg.prompts_per_round  # run_prompts' name for the prompts of one sampling batch
    return run_prompts(plan, records, tokenizer, start_path)


def verifier(records: list | None, tokenizer):
    """GRPO's verifier reward: the world's, or the answer matcher of world/answers.py for a user's prompts and for
    a chat model's replies."""
    if has_chat_template(tokenizer):
        return answer_rewards
    return reward_function("verifier", user_prompts=records is not None)


def round_rollouts(model, tokenizer, cfg, held_out: HeldOut, prompts: list[str], answers: list[str], reward_fn,
                   round_index: int) -> Rollouts:
    """Round `round_index`'s (from 0) prompts_per_round prompts, num_generations samples each, scored."""
    window = slice(round_index * cfg.prompts_per_round, (round_index + 1) * cfg.prompts_per_round)
    return sample_rollouts(model, tokenizer, prompts[window], answers[window], num_samples=cfg.num_generations,
                           max_new_tokens=held_out.max_new_tokens, temperature=cfg.temperature,
                           seed=cfg.seed * 1_000_003 + round_index, reward_fn=reward_fn, decode=cfg.rollout_decode)


def verified_rows(rollouts: Rollouts, group_size: int, max_per_prompt: int = 0) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) rows to fine-tune on: of each prompt's `group_size` samples (prompt-major), those
    the verifier marks right (reward 1) that ended with EOS, the first of each distinct text, at most
    `max_per_prompt` of them (0: all). A sample cut at the budget never ends: SFT on it would teach not to stop."""
    rows = []
    for start in range(0, len(rollouts.texts), group_size):
        first = {}  # text -> the index of its first right, finished sample
        for i in range(start, start + group_size):
            if rollouts.rewards[i] == 1 and rollouts.stopped[i]:
                first.setdefault(rollouts.texts[i], i)
        kept = list(first.values())
        rows += [rollouts.row(i) for i in (kept[:max_per_prompt] if max_per_prompt else kept)]
    return rows


def fine_tune(model, tokenizer, rows: list, cfg: ExpertIterationConfig, folder, round_index: int) -> TrainResult:
    """`cfg.steps` SFT steps on the kept rows, in an epoch-wise seeded shuffle (data.EncodedDataset)."""
    data = EncodedDataset(rows, tokenizer.pad_token_id, cfg.batch_size, cfg.seed + round_index)
    return train(model, data.batch, causal_lm_loss, cfg, folder, desc=f"expert iteration round {round_index + 1}")


def run_rounds(cfg, out, model, tokenizer, reference, held_out: HeldOut, prompts: list[str], answers: list[str],
               reward_fn, train_round) -> tuple[list[dict], dict, TrainResult]:
    """The rounds of a self-training run (expert iteration, online DPO): sample the round's rollouts from the
    current policy, `train_round(rollouts, folder, round_index)` -> (what it logs, its TrainResult or None when the
    round had nothing to train on), then measure held-out accuracy and KL to `reference`. Returns the rounds'
    metrics.jsonl lines, the last measurement, and the timing of the whole loop."""
    lines, train_time, train_tokens, t0 = [], 0.0, 0.0, time.perf_counter()
    with JsonlWriter(out / "metrics.jsonl", resume_step=0) as writer:
        for r in range(cfg.rounds):
            rollouts = round_rollouts(model, tokenizer, cfg, held_out, prompts, answers, reward_fn, r)
            logged, result = train_round(rollouts, out / "rounds" / str(r + 1), r)
            after = held_out.measure(model, tokenizer, reference)
            line = {"step": (r + 1) * cfg.steps, "round": r + 1, "samples": len(rollouts.texts),
                    "sampled_accuracy": rollouts.rewards.mean().item(), **logged,
                    "accuracy": after["accuracy"], "kl": after["kl"]}
            writer.log(frontier_line(line, r == cfg.rounds - 1))
            lines.append(line)
            train_time += result.time_s if result else 0.0
            train_tokens += result.tokens_per_s * result.time_s if result else 0.0
    timing = TrainResult(lines, lines[-1], time.perf_counter() - t0, train_tokens / max(train_time, 1e-9))
    return lines, after, timing


def frontier_line(line: dict, last_round: bool) -> dict:
    """A round's metrics.jsonl line; every round's but the last carries DPO's `eval/` keys (dpo.frontier_points
    reads them as the frontier's middle points; the run's final measurement is its end point)."""
    return line if last_round else {**line, "eval/accuracy": line["accuracy"], "eval/kl": line["kl"]}


def finish(out, method: str, title: str, cfg, model, tokenizer, start_path: str, baseline: dict, after: dict,
           lines: list[dict], timing: TrainResult, metrics: dict) -> dict:
    """Save the policy, samples.jsonl, training_curve.png (each round's share of right samples where it was drawn,
    and held-out accuracy after it), summary.json with `metrics` beside the shared ones, and the reward-KL frontier."""
    save_policy(model, tokenizer, out, start_path)
    write_samples(out / "samples.jsonl", after)
    if is_main_process():
        sampled = [{"step": line["step"] - cfg.steps, "sampled_accuracy": line["sampled_accuracy"]} for line in lines]
        held = [{"step": 0, "accuracy": baseline["accuracy"]}, *({"step": line["step"], "accuracy": line["accuracy"]}
                                                                 for line in lines)]
        points = sampled + held  # a round's samples are drawn at its first step, measured after its last
        training_curve(points, out / "training_curve.png", f"{title}: share of right samples, held-out accuracy",
                       metric="sampled_accuracy", eval_metric="accuracy")
    metrics = {**headline(after), **metrics, "samples_drawn": sum(line["samples"] for line in lines), "rounds": lines,
               "frontier": frontier_points(out, baseline["accuracy"], cfg.rounds * cfg.steps, after)}
    summary = write_summary(out, method, cfg, metrics, headline(baseline), model, timing, model_dir=str(out / "model"))
    if is_main_process():  # it reads summary.json, which only rank 0 writes
        draw_frontier(out)
    return summary


def run(cfg: ExpertIterationConfig, resume: bool = False) -> dict:
    refuse_resume(resume, "expert-iteration")
    records = read_prompts(cfg.data, cfg.prompt_field, cfg.answer_field) if cfg.data else None  # bad data fails first
    out = prepare_output(cfg.output_dir, resume)
    start_path = policy_path(cfg.model)
    model, tokenizer = load_model(start_path)
    reference = load_model(start_path)[0].requires_grad_(False)  # the start policy: each round's KL to it
    held_out, prompts, answers = round_prompts(cfg, records, tokenizer, start_path)
    baseline = held_out.measure(model, tokenizer, kl=False)

    def train_round(rollouts, folder, round_index: int) -> tuple[dict, TrainResult | None]:
        rows = verified_rows(rollouts, cfg.num_generations, cfg.max_per_prompt)
        result = fine_tune(model, tokenizer, rows, cfg, folder, round_index) if rows else None
        return {"kept": len(rows), "loss": result.final_metrics["loss"] if result else None}, result

    lines, after, timing = run_rounds(cfg, out, model, tokenizer, reference, held_out, prompts, answers,
                                      verifier(records, tokenizer), train_round)
    kept = sum(line["kept"] for line in lines)
    return finish(out, "expert-iteration", "Expert iteration", cfg, model, tokenizer, start_path, baseline, after,
                  lines, timing, {"kept_samples": kept})
