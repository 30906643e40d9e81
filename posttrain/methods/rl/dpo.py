"""Direct Preference Optimisation (DPO, Rafailov et al. 2023) and its variants IPO, cDPO and SimPO.

DPO fits the policy to preference pairs directly, with the reference policy standing in for a
reward model: the implicit reward of a completion is beta * log(pi(y|x) / ref(y|x)).

    pairs:   the SFT policy samples G completions per training prompt; the verifier labels them;
             a correct completion is `chosen`, an incorrect one of the same prompt `rejected`
             (or user pairs: `--data pairs.jsonl` with prompt/chosen/rejected records)
    ref:     log ref(y|x) of every completion, computed once before training (precompute_ref_logps),
             so only the policy is in memory while it trains
    step:    chosen and rejected rows in one forward (packed: the prefix they share is computed once,
             packing.py), summed completion log-probs,
             loss = DPO_LOSSES[loss](...)  (losses/dpo.py: sigmoid | cdpo | ipo | simpo)

Unlike the paper, which uses human preference data and a separately trained SFT model, the pairs here
are on-policy samples of the shared chain-of-thought SFT policy (posttrain.stages.policy: 4-digit
addition, right about two times in three) judged by the world's verifier. Held-out accuracy and the KL
to the reference are measured every `eval_every` steps: the run's points on the reward-KL frontier
(reward_kl_frontier.png; `posttrain report` draws the methods side by side). `beta_sweep=0.03,0.3,1` retrains on the same
pairs at each beta and plots accuracy and KL against beta (beta_sweep.png).

Why the defaults are what they are: the policy's own pairs are few (only prompts with both a right
and a wrong sample give one) and a chosen and a rejected completion share most of their tokens. Many
epochs of plain DPO over so few pairs show the likelihood displacement of Razin et al. 2024: the
log-prob of the chosen completions falls with the rejected ones, and held-out accuracy collapses at a
large KL. The defaults keep the chosen completions' NLL in the loss (RPO, Pang et al. 2024) and train
12 steps at 5e-5, a few epochs over the pairs (their count depends on the policy's samples). Even with
RPO, more epochs over-optimise: held-out accuracy peaks and then falls as the chosen log-probs drift
down and the KL grows; 12 steps stop near the peak at a small KL.

    posttrain dpo --output-dir runs/dpo
    posttrain dpo rpo_alpha=0 steps=100 lr=1e-4      # plain DPO: watch logps/chosen fall
    posttrain dpo loss=ipo beta=0.5
    posttrain dpo --model ./my-policy --data pairs.jsonl
    posttrain dpo lora_r=8 lr=1e-3                   # train a LoRA update (adapter/ in PEFT's format)
    posttrain dpo --model posttrain:smollm2-135m     # the real pretrained LLM, on its own replies (its preset)

With a chat model and no `--data` (`--model posttrain:smollm2-135m`), the pairs come from its own replies to
world additions asked in words (world/chat.py), right and wrong read by convention (world/answers.py).

With `--data`, a seeded tenth of the pairs is held out (at most `eval_problems` of them measured) and
`accuracy` (also named `preference_accuracy`) is the share of them whose implicit reward margin prefers the
chosen completion, before and after training (`preference_accuracy`: before, the policy is its own reference).

With `lora_r` > 0 only a LoRA update of `lora_targets` trains; a reference that is not precomputed is
then the policy with its adapters switched off (`lora.disabled`), never a second model. LoRA
needs a higher learning rate than full-weight DPO (1e-3 with r = 8: 5e-4 is too slow for 12 steps,
2e-3 over-optimises).
"""
from __future__ import annotations

import dataclasses
import functools
import json

import torch

from posttrain import lora
from posttrain.chat_world import CHAT_MAX_NEW_TOKENS, GeneralProbe, general_nll, uses_chat_world
from posttrain.data import RowLimit, encode_rows, has_chat_template, pad_batch
from posttrain.errors import UserError
from posttrain.generation import sequence_logprobs
from posttrain.lora import AdapterConfig
from posttrain.losses.dpo import DPO_LOSSES, PairLogps, chosen_nll, preference_metrics
from posttrain.losses.sft import IGNORE
from posttrain.methods.common import (headline, is_main_process, policy_path, prepare_output, save_policy,
                                      write_samples, write_summary)
from posttrain.models import load_model
from posttrain.records import read_preferences, split_records
from posttrain.report.plots import training_curve
from posttrain.report.rl_plots import beta_sweep_plot, draw_frontier
from posttrain.world.answers import answer_rewards
from posttrain.heldout import HeldOut, reference_kl
from posttrain.rollouts import Rollouts, cot_prompts, sample_rollouts, training_problems, verifier_rewards
from posttrain.training import TrainingConfig, row_count, train
from posttrain.world.chat import chat_requests


@dataclasses.dataclass
class DPOConfig(AdapterConfig, TrainingConfig):
    model: str = "sft-policy"  # starting policy and reference: sft-policy (shared CoT SFT model), a folder or hub id
    data: str | None = None  # JSONL of prompt/chosen/rejected pairs; default: pairs from the policy's own samples
    output_dir: str = "runs/dpo"  # where summary.json, metrics.jsonl, plots and the model go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    loss: str = "sigmoid"  # sigmoid (DPO) | cdpo | ipo | simpo
    beta: float = 0.1  # strength of the pull toward the reference (SimPO: the reward scale)
    label_smoothing: float = 0.1  # cdpo: probability that a pair's label is flipped
    simpo_gamma: float = 0.5  # simpo: target margin of the length-normalised rewards
    rpo_alpha: float = 1.0  # weight of the chosen completions' NLL added to the loss (RPO; 0: plain DPO)
    pair_prompts: int = 256  # training prompts sampled for pairs
    samples_per_prompt: int = 8  # completions sampled per prompt (one shared prefill)
    pairs_per_prompt: int = 2  # at most this many (correct, incorrect) pairs per prompt
    temperature: float = 1.0  # sampling temperature of the pair completions
    precompute_ref_logps: bool = True  # reference log-probs once up front (false: keep the reference model)
    beta_sweep: list[float] = dataclasses.field(default_factory=list)  # extra betas trained on the same pairs
    eval_every: int = 4  # steps between held-out accuracy/KL measurements (0: start and end only)
    eval_problems: int = 300  # held-out test problems for accuracy
    kl_problems: int = 100  # held-out prompts whose samples measure KL to the reference
    steps: int = 12  # ~2.6 epochs over the default run's pairs; more over-optimises (docstring)
    batch_size: int = 32  # pairs per step
    lr: float = 5e-5
    warmup_steps: int = 3

    def validate(self) -> None:
        super().validate()
        if self.loss not in DPO_LOSSES:
            raise UserError(f"loss must be one of {', '.join(DPO_LOSSES)}, got '{self.loss}'")
        if self.beta <= 0 or any(b <= 0 for b in self.beta_sweep):
            raise UserError("beta (and every beta_sweep value) must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise UserError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.samples_per_prompt < 2 or self.pairs_per_prompt < 1:
            raise UserError("samples_per_prompt must be >= 2 and pairs_per_prompt >= 1")


CONFIG = DPOConfig
# --quick: the smoke-sized twin policy on 2-digit addition.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "pair_prompts": 64, "steps": 20, "warmup_steps": 10,
         "eval_every": 0, "eval_problems": 100, "kl_problems": 32}

# The real pretrained chat model: pairs from its own replies to 2-digit additions asked in words, sampled at
# the temperature its GRPO preset uses (at 1.0 few replies are right, so few prompts give a pair).
PRESETS = {"posttrain:smollm2-135m": {
    "difficulties": "2", "pair_prompts": 128, "samples_per_prompt": 8, "temperature": 0.7, "steps": 16,
    "batch_size": 16, "lr": 1e-5, "warmup_steps": 2, "eval_every": 8, "kl_problems": 32,
}}

# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's DPOConfig learning rate
# (trl/trainer/dpo_config.py).
LARGE_MODEL = {"lr": 1e-6}

LOSS_OPTIONS = {"cdpo": ("label_smoothing",), "simpo": ("simpo_gamma",)}  # config fields a loss needs


def bind_loss(cfg: DPOConfig, beta: float):
    """DPO_LOSSES[cfg.loss] with beta and the loss's own options filled in."""
    options = {name.removeprefix("simpo_"): getattr(cfg, name) for name in LOSS_OPTIONS.get(cfg.loss, ())}
    return functools.partial(DPO_LOSSES[cfg.loss], beta=beta, **options)


def policy_rollouts(model, tokenizer, cfg, n_prompts: int, max_new_tokens: int, chat: bool = False) -> Rollouts:
    """`cfg.samples_per_prompt` samples of the policy for each of `n_prompts` training prompts, rewarded 1 (right)
    or 0: world problems as CoT prompts judged by the world's verifier, or with `chat` as a chat model's requests,
    the answers read by convention (world/answers.py)."""
    problems = training_problems(cfg.difficulties, n_prompts, cfg.seed)
    prompts, answers = chat_requests(problems) if chat else cot_prompts(problems)
    return sample_rollouts(model, tokenizer, prompts, answers, num_samples=cfg.samples_per_prompt,
                           max_new_tokens=max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                           reward_fn=answer_rewards if chat else verifier_rewards)


def policy_pairs(model, tokenizer, cfg: DPOConfig, max_new_tokens: int, chat: bool = False) -> tuple[list, dict]:
    """(chosen, rejected) encoded rows from the policy's own samples (`policy_rollouts`), and how they were found."""
    rollouts = policy_rollouts(model, tokenizer, cfg, cfg.pair_prompts, max_new_tokens, chat)
    pairs = group_pairs(rollouts, cfg.samples_per_prompt, cfg.pairs_per_prompt)
    if not pairs:
        raise UserError("no preference pairs: every prompt's samples were all right or all wrong; "
                        "raise samples_per_prompt or temperature")
    info = {"pairs": len(pairs), "sampled_accuracy": rollouts.rewards.mean().item(),
            "completions_sampled": len(rollouts.texts)}
    return pairs, info


def group_pairs(rollouts: Rollouts, group_size: int, pairs_per_prompt: int) -> list:
    """(chosen, rejected) encoded rows of each prompt's group of `group_size` samples (prompt-major): its distinct
    right (reward 1) and distinct wrong (reward 0) texts zipped in sampling order, at most `pairs_per_prompt`
    pairs; none from a group whose samples are all right or all wrong."""
    pairs = []
    for start in range(0, len(rollouts.texts), group_size):
        group = range(start, start + group_size)
        right = list({rollouts.texts[i]: i for i in group if rollouts.rewards[i] == 1}.values())  # distinct texts
        wrong = list({rollouts.texts[i]: i for i in group if rollouts.rewards[i] == 0}.values())
        pairs += [(rollouts.row(c), rollouts.row(r)) for c, r in list(zip(right, wrong))[:pairs_per_prompt]]
    return pairs


def pair_tensors(pairs: list, pad_id: int) -> dict:
    """Pairs as (P, 2, T) tensors, chosen at [:, 0] and rejected at [:, 1]: one forward takes both."""
    flat = pad_batch([row for pair in pairs for row in pair], pad_id)  # (2P, T), rows c0 r0 c1 r1 ...
    return {k: v.view(len(pairs), 2, -1) for k, v in flat.items()}


def pair_logps(model, batch: dict) -> torch.Tensor:
    """Summed completion log-probs (B, 2) of a (B, 2, T) pair batch, chosen and rejected in one forward."""
    flat = {k: batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "labels")}
    return sequence_logprobs(model, flat).view(-1, 2)


@torch.no_grad()
def all_pair_logps(model, tensors: dict, chunk: int = 64) -> torch.Tensor:
    """pair_logps over every pair, a chunk at a time: (P, 2). The model is left in the mode it was in (a
    measurement during training must not switch its dropout off)."""
    was_training = model.training
    model.eval()
    rows = len(tensors["input_ids"])
    logps = torch.cat([pair_logps(model, {k: v[i : i + chunk] for k, v in tensors.items()}).cpu()
                       for i in range(0, rows, chunk)])
    model.train(was_training)
    return logps


def pair_batches(tensors: dict, batch_size: int, seed: int):
    """batch_fn for training.train: an epoch-wise seeded shuffle of the pairs, a pure function of the step."""
    n = len(tensors["input_ids"])

    def batch(step: int) -> dict:
        per_epoch = max(1, n // batch_size)
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        picks = order[index * batch_size : (index + 1) * batch_size]
        width = int(tensors["attention_mask"][picks].sum(-1).max())  # right padding: trim shared pad columns
        return {k: v[picks][..., :width] if v.dim() == 3 else v[picks] for k, v in tensors.items()}

    return batch


def dpo_loss_fn(loss, beta: float, rpo_alpha: float, reference=None):
    """loss_fn for training.train: reference log-probs from the batch when precomputed, else from
    `reference`, else (LoRA) from the policy with its adapters switched off."""

    def reference_logps(model, batch) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if reference is not None:
                return pair_logps(reference, batch)
            with lora.disabled(model):  # refuses a model without adapters
                return pair_logps(model, batch)

    def loss_fn(model, batch):
        logps = pair_logps(model, batch)  # (B, 2)
        ref = reference_logps(model, batch)
        tokens = (batch["labels"][..., 1:] != IGNORE).sum(-1)  # (B, 2) completion lengths
        p = PairLogps(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1])
        nll = chosen_nll(p).mean()
        value = loss(p).mean() + rpo_alpha * nll
        return value, {"loss": value.item(), "nll/chosen": nll.item(), **preference_metrics(p, beta)}

    return loss_fn


def encode_records(tokenizer, records, limit: RowLimit | None = None) -> tuple[list, dict]:
    """(chosen row, rejected row) of each record within `limit` (data.encode_rows), and the counts of rows cut
    and dropped; both rows of a record share its prompt, so one whose prompt fills the limit loses both."""
    n = len(records)
    rows = [(r.prompt, r.chosen) for r in records] + [(r.prompt, r.rejected) for r in records]
    encoded = encode_rows(tokenizer, rows, limit)
    row = dict(zip(encoded.kept, encoded.rows))  # chosen rows at 0..n-1, rejected at n..2n-1
    return [(row[i], row[n + i]) for i in range(n) if i in row and n + i in row], encoded.counts


def held_prompts(records) -> list:
    """The distinct prompts of `records`, in a fixed order: strings, or message tuples (chat records)."""
    return sorted({r.prompt for r in records}, key=str)


def held_out_pairs(reference, tokenizer, records) -> dict:
    """The held-out pairs as (P, 2, T) tensors, with the reference's (the start policy's) log-probs of them,
    (P, 2), computed once."""
    held = pair_tensors(encode_records(tokenizer, records)[0], tokenizer.pad_token_id)
    return {**held, "ref_logps": all_pair_logps(reference, held)}


def measure_on_records(model, *, tokenizer, held: dict, prompts: list[str], loss: str, start_path: str, seed: int,
                       kl: bool = True) -> dict:
    """User pairs: held-out preference accuracy (`accuracy` too: the frontier and the report read that name),
    and KL to the start policy on samples for their prompts."""
    share = preference_accuracy(model, held, reference_free=loss == "simpo")
    result = {"accuracy": share, "preference_accuracy": share, "n": len(held["input_ids"])}
    if kl:
        budget = int((held["labels"][..., 1:] != IGNORE).sum(-1).max()) + 8  # the longest held-out completion, and slack
        result["kl"] = reference_kl(model, load_model(start_path)[0], tokenizer, prompts, max_new_tokens=budget, seed=seed)
    return result


def preference_accuracy(model, held: dict, reference_free: bool = False) -> float:
    """Share of held-out pairs whose implicit reward prefers the chosen completion (ties count 1/2):

        margin = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))    DPO, cDPO, IPO: r = beta log pi/ref
        margin = log pi(y_w) / |y_w| - log pi(y_l) / |y_l|                      SimPO: r = beta/|y| log pi

    (beta > 0 scales the margin, not its sign.) Before training the policy is its own reference, so every DPO
    margin is 0 and the share is 1/2: chance; SimPO's reference-free margin is the start policy's own
    per-token preference."""
    logps = all_pair_logps(model, held)  # (P, 2)
    if reference_free:
        scores = logps / (held["labels"][..., 1:] != IGNORE).sum(-1)  # (P, 2): mean log-prob per token
    else:
        scores = logps - held["ref_logps"]  # (P, 2): log-ratios to the reference
    margin = scores[:, 0] - scores[:, 1]  # (P,)
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def held_out_eval(model, measure, steps: int):
    """eval_fn for training.train: held-out accuracy and KL to the start policy, except after the last step
    (the run's final measurement follows training)."""

    def eval_fn(step: int) -> dict:
        if step == steps:
            return {}
        point = measure(model)
        return {"eval/accuracy": point["accuracy"], "eval/kl": point["kl"]}

    return eval_fn


def train_dpo(cfg: DPOConfig, start_path: str, tensors: dict, beta: float, out, resume: bool, measure) -> tuple:
    """Train a fresh copy of the start policy on the pairs at `beta`; returns (model, tokenizer, TrainResult)."""
    model, tokenizer = load_model(start_path)
    if cfg.lora_r:  # a reference not precomputed is then the policy with its adapters off
        lora.inject(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, seed=cfg.seed)
    keep_reference = not (cfg.precompute_ref_logps or cfg.lora_r)
    reference = load_model(start_path)[0].requires_grad_(False) if keep_reference else None
    loss_fn = dpo_loss_fn(bind_loss(cfg, beta), beta, cfg.rpo_alpha, reference)

    result = train(model, pair_batches(tensors, cfg.batch_size, cfg.seed), loss_fn, dataclasses.replace(cfg, beta=beta),
                   out, resume=resume, eval_fn=held_out_eval(model, measure, cfg.steps) if measure else None, eval_every=cfg.eval_every, desc=f"dpo b={beta}",
                   averages_over=row_count)  # the pairs
    return model, tokenizer, result


def world_held_out(cfg, tokenizer, start_path: str, chat: bool) -> HeldOut:
    """The held-out world problems a run measures itself on: CoT prompts, or with `chat` requests in words."""
    if chat:
        return HeldOut.of_chat(cfg.difficulties, cfg.eval_problems, cfg.kl_problems, start_path, cfg.seed,
                               CHAT_MAX_NEW_TOKENS)
    return HeldOut.of(tokenizer, cfg.difficulties, cfg.eval_problems, cfg.kl_problems, start_path, cfg.seed)


def run(cfg: DPOConfig, resume: bool = False) -> dict:
    records = read_preferences(cfg.data) if cfg.data else None  # bad data fails before anything slow
    out = prepare_output(cfg.output_dir, resume)
    start_path = policy_path(cfg.model)
    model, tokenizer = load_model(start_path)
    if records:
        train_records, held_records = split_records(records, cfg.seed, cfg.eval_problems)
        pairs, counts = encode_records(tokenizer, train_records, RowLimit.of(cfg, model))
        pair_info = {"pairs": len(pairs), **counts}
        held = held_out_pairs(model, tokenizer, held_records)  # `model` is the start policy: the reference
        measure = functools.partial(measure_on_records, tokenizer=tokenizer, held=held, loss=cfg.loss,
                                    prompts=held_prompts(held_records), start_path=start_path, seed=cfg.seed)
    else:
        chat = has_chat_template(tokenizer)  # a chat model: world additions asked as requests (world/chat.py)
        held_out = world_held_out(cfg, tokenizer, start_path, chat)
        measure = functools.partial(held_out.measure, tokenizer=tokenizer)
        pairs, pair_info = policy_pairs(model, tokenizer, cfg, held_out.max_new_tokens, chat)

    probe = GeneralProbe.of(model, tokenizer) if uses_chat_world(tokenizer, cfg.data) else None  # what it loses
    baseline = {**measure(model, kl=False), **general_nll(probe, model, tokenizer)}
    tensors = pair_tensors(pairs, tokenizer.pad_token_id)
    if cfg.precompute_ref_logps:
        tensors["ref_logps"] = all_pair_logps(model, tensors)  # the start policy is the reference
    del model  # a fresh copy is trained (the beta sweep starts from it again)

    model, tokenizer, result = train_dpo(cfg, start_path, tensors, cfg.beta, out, resume, measure)
    after = {**measure(model), **general_nll(probe, model, tokenizer)}
    save_policy(model, tokenizer, out, start_path)
    if not records:
        write_samples(out / "samples.jsonl", after)
    training_curve(result.history, out / "training_curve.png", f"DPO ({cfg.loss}, beta={cfg.beta})",
                   metric="loss", eval_metric="eval/accuracy")
    frontier = frontier_points(out, baseline["accuracy"], cfg.steps, after)
    sweep = beta_sweep(cfg, start_path, tensors, out, after, measure) if cfg.beta_sweep else []
    train_metrics = {k: v for k, v in result.final_metrics.items() if k.startswith(("rewards/", "logps/"))}
    metrics = {**headline(after), **train_metrics, **pair_info, "frontier": frontier, "beta_sweep": sweep}
    summary = write_summary(out, "dpo", cfg, metrics, headline(baseline), model, result, model_dir=str(out / "model"))
    if is_main_process():  # it reads summary.json, which only rank 0 writes
        draw_frontier(out)
    return summary


def frontier_points(out, start_accuracy: float, steps: int, after: dict) -> list[dict]:
    """Start, every held-out measurement in metrics.jsonl (a resumed run keeps its earlier ones), end."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    middle = [{"step": r["step"], "accuracy": r["eval/accuracy"], "kl": r["eval/kl"]} for r in lines if "eval/kl" in r]
    return [{"step": 0, "accuracy": start_accuracy, "kl": 0.0}, *middle,
            {"step": steps, "accuracy": after["accuracy"], "kl": after["kl"]}]


def beta_sweep(cfg: DPOConfig, start_path: str, tensors: dict, out, after: dict, measure) -> list[dict]:
    """Retrain on the same pairs at each extra beta; accuracy and KL at the end of each run, plotted."""
    points = [{"beta": cfg.beta, "accuracy": after["accuracy"], "kl": after["kl"]}]
    for beta in cfg.beta_sweep:
        model, _, _ = train_dpo(cfg, start_path, tensors, beta, out / "beta_sweep" / f"beta={beta}", False, None)
        point = measure(model)
        points.append({"beta": beta, "accuracy": point["accuracy"], "kl": point["kl"]})
    beta_sweep_plot(points, out / "beta_sweep.png")
    return points
