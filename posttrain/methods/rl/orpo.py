"""Odds Ratio Preference Optimisation (ORPO, Hong et al. 2024): SFT and preference learning in one loss,
with no reference model.

    pairs:   as DPO's (dpo.policy_pairs): the SFT policy samples G completions per training prompt, the
             verifier labels them, a right one is `chosen` and a wrong one of the same prompt `rejected`
             (or user pairs: `--data pairs.jsonl` with prompt/chosen/rejected records)
    step:    chosen and rejected rows in one forward, their mean token log-probs,
             loss = NLL(chosen) + lambda * -log sigmoid(log odds(chosen) - log odds(rejected))  (losses/orpo.py)

The paper applies ORPO to a base model, in place of SFT followed by preference optimisation. Here,
as for DPO, it starts from the shared chain-of-thought SFT policy and its own verifier-labelled pairs,
so the two methods compare on the same data: DPO anchors the policy to a frozen reference, ORPO only to
the chosen completions through its SFT term. Held-out accuracy and KL to the start policy are measured
as DPO measures them (the start policy is loaded only to measure the KL, never to train).

    posttrain orpo --output-dir runs/orpo
    posttrain orpo lam=0.5
    posttrain orpo --model ./my-policy --data pairs.jsonl
"""
from __future__ import annotations

import dataclasses
import functools

from posttrain import lora
from posttrain.chat_world import GeneralProbe, general_nll, uses_chat_world
from posttrain.data import RowLimit, has_chat_template
from posttrain.errors import UserError
from posttrain.lora import AdapterConfig
from posttrain.losses.orpo import orpo_loss, orpo_metrics
from posttrain.losses.sft import IGNORE
from posttrain.methods.common import (headline, is_main_process, policy_path, prepare_output, save_policy,
                                      write_samples, write_summary)
from posttrain.methods.rl.dpo import (encode_records, frontier_points, held_out_eval, held_out_pairs, held_prompts,
                                      measure_on_records, pair_batches, pair_logps, pair_tensors, policy_pairs, world_held_out)
from posttrain.models import load_model
from posttrain.records import read_preferences, split_records
from posttrain.report.plots import training_curve
from posttrain.report.rl_plots import draw_frontier
from posttrain.training import TrainingConfig, row_count, train


@dataclasses.dataclass
class ORPOConfig(AdapterConfig, TrainingConfig):
    model: str = "sft-policy"  # starting policy: sft-policy (shared CoT SFT model), a folder or hub id
    data: str | None = None  # JSONL of prompt/chosen/rejected pairs; default: pairs from the policy's own samples
    output_dir: str = "runs/orpo"  # where summary.json, metrics.jsonl, plots and the model go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    lam: float = 0.1  # lambda, the weight of the odds-ratio term (TRL's beta)
    pair_prompts: int = 256  # training prompts sampled for pairs
    samples_per_prompt: int = 8  # completions sampled per prompt (one shared prefill)
    pairs_per_prompt: int = 2  # at most this many (correct, incorrect) pairs per prompt
    temperature: float = 1.0  # sampling temperature of the pair completions
    eval_every: int = 4  # steps between held-out accuracy/KL measurements (0: start and end only)
    eval_problems: int = 300  # held-out test problems for accuracy
    kl_problems: int = 100  # held-out prompts whose samples measure KL to the start policy
    steps: int = 12  # DPO's budget (dpo.py)
    batch_size: int = 32  # pairs per step
    lr: float = 5e-5
    warmup_steps: int = 3

    def validate(self) -> None:
        super().validate()
        if self.lam < 0:
            raise UserError(f"lam must be >= 0, got {self.lam}")
        if self.samples_per_prompt < 2 or self.pairs_per_prompt < 1:
            raise UserError("samples_per_prompt must be >= 2 and pairs_per_prompt >= 1")


CONFIG = ORPOConfig
# --quick: the smoke-sized twin policy on 2-digit addition, DPO's quick budget.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "pair_prompts": 64, "steps": 20, "warmup_steps": 10,
         "eval_every": 0, "eval_problems": 100, "kl_problems": 32}


def orpo_loss_fn(lam: float):
    """loss_fn for training.train: mean token log-probs of a (B, 2, T) pair batch, the ORPO loss on them."""

    def loss_fn(model, batch):
        logps = pair_logps(model, batch)  # (B, 2) summed
        tokens = (batch["labels"][..., 1:] != IGNORE).sum(-1).clamp(min=1).to(logps.device)  # (B, 2)
        mean = logps / tokens  # (B, 2) mean token log-probs
        nll = -mean[:, 0]
        value = orpo_loss(mean[:, 0], mean[:, 1], nll, lam).mean()
        return value, {"loss": value.item(), "nll_loss": nll.mean().item(), **orpo_metrics(mean[:, 0], mean[:, 1], lam)}

    return loss_fn


def run(cfg: ORPOConfig, resume: bool = False) -> dict:
    records = read_preferences(cfg.data) if cfg.data else None  # bad data fails before anything slow
    out = prepare_output(cfg.output_dir, resume)
    start_path = policy_path(cfg.model)
    model, tokenizer = load_model(start_path)
    if records:
        train_records, held_records = split_records(records, cfg.seed, cfg.eval_problems)
        pairs, counts = encode_records(tokenizer, train_records, RowLimit.of(cfg, model))
        pair_info = {"pairs": len(pairs), **counts}
        held = held_out_pairs(model, tokenizer, held_records)
        # reference-free: ORPO ranks by mean log-prob per token, as its odds ratio does (SimPO's margin)
        measure = functools.partial(measure_on_records, tokenizer=tokenizer, held=held, loss="simpo",
                                    prompts=held_prompts(held_records), start_path=start_path, seed=cfg.seed)
    else:
        chat = has_chat_template(tokenizer)  # a chat model: world additions asked as requests (world/chat.py)
        held_out = world_held_out(cfg, tokenizer, start_path, chat)
        measure = functools.partial(held_out.measure, tokenizer=tokenizer)
        pairs, pair_info = policy_pairs(model, tokenizer, cfg, held_out.max_new_tokens, chat)

    probe = GeneralProbe.of(model, tokenizer) if uses_chat_world(tokenizer, cfg.data) else None  # what it loses
    baseline = {**measure(model, kl=False), **general_nll(probe, model, tokenizer)}
    if cfg.lora_r:
        lora.inject(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, seed=cfg.seed)
    tensors = pair_tensors(pairs, tokenizer.pad_token_id)
    result = train(model, pair_batches(tensors, cfg.batch_size, cfg.seed), orpo_loss_fn(cfg.lam), cfg, out,
                   resume=resume, eval_fn=held_out_eval(model, measure, cfg.steps), eval_every=cfg.eval_every,
                   desc="orpo", averages_over=row_count)  # the pairs
    after = {**measure(model), **general_nll(probe, model, tokenizer)}
    save_policy(model, tokenizer, out, start_path)
    if not records:
        write_samples(out / "samples.jsonl", after)
    training_curve(result.history, out / "training_curve.png", f"ORPO (lambda={cfg.lam})", metric="loss",
                   eval_metric="eval/accuracy")
    train_metrics = {k: v for k, v in result.final_metrics.items()
                     if k.startswith(("rewards/", "logps/", "log_odds", "nll_loss"))}
    metrics = {**headline(after), **train_metrics, **pair_info,
               "frontier": frontier_points(out, baseline["accuracy"], cfg.steps, after)}
    summary = write_summary(out, "orpo", cfg, metrics, headline(baseline), model, result, model_dir=str(out / "model"))
    if is_main_process():  # it reads summary.json, which only rank 0 writes
        draw_frontier(out)
    return summary

