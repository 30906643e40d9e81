"""Kahneman-Tversky Optimisation (KTO, Ethayarajh et al. 2024): the policy learns from single completions
labelled desirable or undesirable, without pairing them.

    examples: the SFT policy samples G completions per training prompt and the verifier labels them, as
              for DPO (dpo.policy_rollouts); every distinct sample is one example, right = desirable,
              wrong = undesirable (or user data: `--data` with prompt/completion/label records)
    z0:       each example x_i also gets a mismatched partner (x_i, y_j), the completion of another prompt;
              the batch's mean log-ratio on its partners, clamped at 0 and detached, is the reference point
    ref:      log ref of every example and partner, computed once before training (the start policy)
    step:     loss = mean(w(y) - v(x, y))   (losses/kto.py)

Where DPO needs a prompt with both a right and a wrong sample to make a pair, KTO uses every sample,
so the same rollouts give it more examples. The paper suggests weights with
w_D * n_D / (w_U * n_U) in [1, 4/3]; the defaults are TRL's (both 1) and summary.json records
n_D and n_U so the ratio can be set from them.

What it shows on the world: from the shared policy KTO raises held-out accuracy as DPO does, at a
smaller KL. From the quick policy (`--quick`), whose samples at temperature 1 are mostly wrong (the right
answer is one distinct sample, the wrong ones many), it does not: pushing the many wrong completions
below the reference point drags down the log-probs of the text they share with the right ones (the
worked steps' format), the loss falls while the right samples' rewards fall too, and held-out accuracy
drops below the start's. Weighting the desirable examples up to balance the counts, a lower temperature
or a larger beta do not prevent it there; a learning rate ten times lower keeps the start's accuracy.
DPO's margin, a difference of two log-ratios, cancels what right and wrong completions share.

Departures: the paper and TRL pair each example with the completion next to it in its batch; here the
mismatched partner is fixed once (the next prompt's completions, in turn), so its reference log-prob is
precomputed like the example's. The reference is always precomputed.

    posttrain kto --output-dir runs/kto
    posttrain kto undesirable_weight=2 beta=0.3
    posttrain kto --model ./my-policy --data labelled.jsonl

Held-out accuracy and KL to the start policy are measured like DPO's (dpo.py): greedy accuracy on
held-out world problems, or on user data the share of (desirable, undesirable) held-out records that
the policy ranks right by per-token log-prob.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from posttrain import lora
from posttrain.chat_world import GeneralProbe, general_nll, uses_chat_world
from posttrain.data import encode_pair, has_chat_template, pad_batch
from posttrain.errors import UserError
from posttrain.generation import sequence_logprobs
from posttrain.lora import AdapterConfig
from posttrain.losses.kto import kl_reference_point, kto_loss, kto_metrics
from posttrain.losses.sft import IGNORE
from posttrain.methods.common import (headline, is_main_process, policy_path, prepare_output, save_policy,
                                      write_samples, write_summary)
from posttrain.methods.rl.dpo import (all_pair_logps, frontier_points, held_out_eval, pair_batches, pair_tensors,
                                      policy_rollouts, world_held_out)
from posttrain.models import load_model
from posttrain.records import read_unpaired, split_records
from posttrain.report.plots import training_curve
from posttrain.report.rl_plots import draw_frontier
from posttrain.heldout import reference_kl
from posttrain.rollouts import Rollouts
from posttrain.training import TrainingConfig, row_count, train


@dataclasses.dataclass
class KTOConfig(AdapterConfig, TrainingConfig):
    model: str = "sft-policy"  # starting policy and reference: sft-policy (shared CoT SFT model), a folder or hub id
    data: str | None = None  # JSONL of prompt/completion/label records; default: the policy's own labelled samples
    output_dir: str = "runs/kto"  # where summary.json, metrics.jsonl, plots and the model go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    beta: float = 0.1  # scale of the implicit reward inside the sigmoid
    desirable_weight: float = 1.0  # w_D, the weight of a desirable example's loss
    undesirable_weight: float = 1.0  # w_U, the weight of an undesirable example's loss
    sample_prompts: int = 256  # training prompts sampled for examples
    samples_per_prompt: int = 8  # completions sampled per prompt (one shared prefill)
    temperature: float = 1.0  # sampling temperature of the example completions
    eval_every: int = 4  # steps between held-out accuracy/KL measurements (0: start and end only)
    eval_problems: int = 300  # held-out test problems for accuracy
    kl_problems: int = 100  # held-out prompts whose samples measure KL to the reference
    steps: int = 12  # DPO's budget (dpo.py)
    batch_size: int = 32  # examples per step
    lr: float = 5e-5
    warmup_steps: int = 3

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise UserError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise UserError("desirable_weight and undesirable_weight must be > 0")
        if self.samples_per_prompt < 1 or self.sample_prompts < 1:
            raise UserError("sample_prompts and samples_per_prompt must be >= 1")


CONFIG = KTOConfig
# --quick: the smoke-sized twin policy on 2-digit addition, DPO's quick budget.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "sample_prompts": 64, "steps": 20, "warmup_steps": 10,
         "eval_every": 0, "eval_problems": 100, "kl_problems": 32}


def labelled_examples(rollouts: Rollouts, samples_per_prompt: int) -> tuple[list, list[bool], list[str]]:
    """The distinct samples of each prompt as encoded rows, their labels (reward 1: desirable) and prompts."""
    rows, labels, prompts = [], [], []
    for start in range(0, len(rollouts.texts), samples_per_prompt):
        distinct = {rollouts.texts[i]: i for i in range(start, start + samples_per_prompt)}.values()
        rows += [rollouts.row(i) for i in distinct]
        labels += [bool(rollouts.rewards[i] == 1) for i in distinct]
        prompts += [rollouts.prompts[i] for i in distinct]
    return rows, labels, prompts


def mismatched_partners(prompts: list[str]) -> list[int]:
    """For each row, the row whose completion it is paired with to estimate z0: rows are grouped by prompt
    (in order of first appearance) and row k of a group takes row k (cyclically) of the next group, so a
    partner's prompt differs wherever the rows hold two prompts or more."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    ordered = list(groups.values())
    partners = [0] * len(prompts)
    for g, members in enumerate(ordered):
        following = ordered[(g + 1) % len(ordered)]
        for k, row in enumerate(members):
            partners[row] = following[k % len(following)]
    return partners


def with_completion_of(row: tuple, other: tuple) -> tuple[list[int], list[int]]:
    """`row`'s prompt followed by `other`'s completion, as (input_ids, labels)."""
    prompt_ids = row[0][: row[1].count(IGNORE)]  # the prompt is the unlabelled prefix
    completion_ids = other[0][other[1].count(IGNORE) :]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def example_tensors(rows: list, labels: list[bool], prompts: list[str], pad_id: int) -> dict:
    """Examples as (N, 2, T) tensors, each at [:, 0] and its mismatched partner at [:, 1] (dpo.pair_tensors'
    layout, so DPO's batching and log-prob passes take them), and `desirable` (N,) bool."""
    partners = mismatched_partners(prompts)
    tensors = pair_tensors([(row, with_completion_of(row, rows[j])) for row, j in zip(rows, partners)], pad_id)
    tensors["desirable"] = torch.tensor(labels)
    return tensors


def column(batch: dict, i: int) -> dict:
    """The (B, T) batch of column i of a (B, 2, T) batch: the examples (0) or their partners (1)."""
    return {k: batch[k][:, i] for k in ("input_ids", "attention_mask", "labels")}


def kto_loss_fn(cfg: KTOConfig):
    """loss_fn for training.train: the examples' log-probs with gradient, their partners' without (z0 is
    detached), reference log-probs from the batch."""

    def loss_fn(model, batch):
        logps = sequence_logprobs(model, column(batch, 0))  # (B,)
        with torch.no_grad():
            partner_logps = sequence_logprobs(model, column(batch, 1))
        ref = batch["ref_logps"].to(logps.device)  # (B, 2)
        desirable = batch["desirable"].to(logps.device)
        z0 = kl_reference_point(partner_logps, ref[:, 1])
        value = kto_loss(logps, ref[:, 0], desirable, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight).mean()
        return value, {"loss": value.item(), **kto_metrics(logps, ref[:, 0], desirable, z0, cfg.beta)}

    return loss_fn


def split_by_label(records: list, seed: int, path: str) -> tuple[list, list]:
    """(train, held_out) user records, a seeded tenth of each label held out, so both labels are measured."""
    desirable = [r for r in records if r.label]
    undesirable = [r for r in records if not r.label]
    if not desirable or not undesirable:
        raise UserError(f"{path}: every record has 'label' {str(bool(desirable)).lower()}; KTO's held-out "
                        "accuracy ranks desirable against undesirable completions: give records of both labels")
    (train_d, held_d), (train_u, held_u) = split_records(desirable, seed), split_records(undesirable, seed)
    return train_d + train_u, held_d + held_u


def ranking_accuracy(scores: torch.Tensor, desirable: torch.Tensor) -> float:
    """Share of (desirable, undesirable) pairs of rows whose desirable row scores higher: scores (N,), desirable (N,)."""
    return (scores[desirable][:, None] > scores[~desirable][None, :]).float().mean().item()


@torch.no_grad()
def mean_token_logps(model, rows: list, pad_id: int, chunk: int = 64) -> torch.Tensor:
    """Per-token completion log-prob of each row, (N,)."""
    model.eval()
    scores = []
    for i in range(0, len(rows), chunk):
        batch = pad_batch(rows[i : i + chunk], pad_id)
        tokens = (batch["labels"][:, 1:] != IGNORE).sum(-1).clamp(min=1)
        scores.append(sequence_logprobs(model, batch).cpu() / tokens)
    return torch.cat(scores)


def measure_on_records(model, *, tokenizer, records, start_path: str, seed: int, kl: bool = True) -> dict:
    """User records: held-out ranking accuracy (`ranking_accuracy` of per-token log-probs), and KL to the start
    policy on samples for their prompts."""
    rows = [encode_pair(tokenizer, r.prompt, r.completion) for r in records]
    scores = mean_token_logps(model, rows, tokenizer.pad_token_id)
    result = {"accuracy": ranking_accuracy(scores, torch.tensor([r.label for r in records])), "n": len(records)}
    if kl:
        budget = max(len(ids) - labels.count(IGNORE) for ids, labels in rows) + 8  # the longest completion, and slack
        prompts = sorted({r.prompt for r in records})
        result["kl"] = reference_kl(model, load_model(start_path)[0], tokenizer, prompts, max_new_tokens=budget, seed=seed)
    return result


def run(cfg: KTOConfig, resume: bool = False) -> dict:
    records = read_unpaired(cfg.data) if cfg.data else None  # bad data fails before anything slow
    train_records, held_records = split_by_label(records, cfg.seed, cfg.data) if records else (None, None)
    out = prepare_output(cfg.output_dir, resume)
    start_path = policy_path(cfg.model)
    model, tokenizer = load_model(start_path)
    if records:
        rows = [encode_pair(tokenizer, r.prompt, r.completion) for r in train_records]
        labels, prompts = [r.label for r in train_records], [r.prompt for r in train_records]
        measure = functools.partial(measure_on_records, tokenizer=tokenizer, records=held_records, start_path=start_path,
                                    seed=cfg.seed)
        sample_info = {}
    else:
        chat = has_chat_template(tokenizer)  # a chat model: world additions asked as requests (world/chat.py)
        held_out = world_held_out(cfg, tokenizer, start_path, chat)
        measure = functools.partial(held_out.measure, tokenizer=tokenizer)
        rollouts = policy_rollouts(model, tokenizer, cfg, cfg.sample_prompts, held_out.max_new_tokens, chat)
        rows, labels, prompts = labelled_examples(rollouts, cfg.samples_per_prompt)
        sample_info = {"sampled_accuracy": rollouts.rewards.mean().item(), "completions_sampled": len(rollouts.texts)}

    probe = GeneralProbe.of(model, tokenizer) if uses_chat_world(tokenizer, cfg.data) else None  # what it loses
    baseline = {**measure(model, kl=False), **general_nll(probe, model, tokenizer)}
    tensors = example_tensors(rows, labels, prompts, tokenizer.pad_token_id)
    tensors["ref_logps"] = all_pair_logps(model, tensors)  # (N, 2): the start policy is the reference
    if cfg.lora_r:
        lora.inject(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, seed=cfg.seed)
    result = train(model, pair_batches(tensors, cfg.batch_size, cfg.seed), kto_loss_fn(cfg), cfg, out, resume=resume,
                   eval_fn=held_out_eval(model, measure, cfg.steps), eval_every=cfg.eval_every, desc="kto",
                   averages_over=row_count)  # the examples
    after = {**measure(model), **general_nll(probe, model, tokenizer)}
    save_policy(model, tokenizer, out, start_path)
    if not records:
        write_samples(out / "samples.jsonl", after)
    training_curve(result.history, out / "training_curve.png", f"KTO (beta={cfg.beta})", metric="loss",
                   eval_metric="eval/accuracy")
    train_metrics = {k: v for k, v in result.final_metrics.items() if k.startswith(("rewards/", "logps/", "kl_ref"))}
    counts = {"desirable": sum(labels), "undesirable": len(labels) - sum(labels)}
    metrics = {**headline(after), **train_metrics, **counts, **sample_info,
               "frontier": frontier_points(out, baseline["accuracy"], cfg.steps, after)}
    summary = write_summary(out, "kto", cfg, metrics, headline(baseline), model, result, model_dir=str(out / "model"))
    if is_main_process():  # it reads summary.json, which only rank 0 writes
        draw_frontier(out)
    return summary
