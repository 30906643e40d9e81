"""Supervised fine-tuning (SFT), and what it costs: catastrophic forgetting, and three defences.

    plain     loss = -1/N sum_t log pi(y_t | x, y_<t)    over completion tokens (EOS included), N of them
    l2sp:S    loss = plain + S/2 * ||theta - theta_0||^2  L2-SP (Li et al. 2018, Eq. 3): stay near the base
    replay:F  plain, on batches where a fraction F of the rows are old-skill examples (rehearsal)
    rehearse:F  replay, with the base model's own greedy answers to old-skill prompts as those rows
              (pseudo-rehearsal, Robins 1995): needs the old prompts, not the old training data

Each defence is a named function in `DEFENCES` (as DPO's losses are in losses/dpo.py): it takes the
variant's setup and value and returns the batches and the loss the variant trains on.

By default the demonstrations are the world's main task (multi-digit addition) at a difficulty the
base model fails, written as chain-of-thought solutions. SFT lifts held-out accuracy on that task;
the price is forgetting. Every world prompt has the same shape (`Q: 34-12`), and a model trained
only on addition learns to answer every prompt with addition: plain SFT takes the base model's
old skills (subtraction, comparison, reversing and sorting lists) to near zero.

Each entry of `variants` trains from the same base model on the same target batches for the same
steps (replay adds its old-skill rows on top of the target rows rather than replacing any), and is
evaluated on the same held-out target problems and old-skill problems. `summary.json` holds
`metrics.forgetting`, one entry per variant (target accuracy, old-skill accuracy, drop from the
base, and how far the weights moved), and `frontier.png` plots old-skill against target accuracy:
the adaptation-forgetting frontier. The first variant is the headline: its target accuracy is
`metrics.accuracy` and its model is saved in `model/`; the others train in `variants/<name>/`.

Why the defences work here. Learning 3-digit addition is a small edit of a base model that already
adds 1-2 digit numbers step by step; plain SFT nevertheless moves the weights far, because Adam
takes steps of about the learning rate on every weight whose gradient is non-zero, however small and
noisy, and the drift accumulates into "everything is addition". L2-SP gives each weight a pull back
to its base value that outweighs those small gradients, so mostly the weights the target needs
move. Its strength sets a point on the frontier: a stronger pull keeps more of the old skills and
shifts the weights less, until it is too strong for the target to be learned. No strength keeps list
reversal. Replay attacks the cause instead: the batches show that other prompts still want other
procedures; it keeps the target and most old skills, but which ones survive depends on its rows:
reverse survives far better when the comparison and sorting rows (the same problems) are shown in
the other format. The failures are
the model's own: after SFT on CoT addition it answers a direct `reverse` prompt with worked steps
and copies digits wrongly in them. Rehearsing the base's own answers removes that mismatch: the
rows ask for exactly what the base did (its format, its mistakes), and rehearse:0.4 keeps the
target and every old skill.

Why 200 steps: 100 steps of plain SFT only just learn the target, and anything that competes for the
updates delays it, so the defences fall short of the target at 100 steps. At 150 steps whether they
reach it within the bar (3 points below plain SFT) depends on the CPU, as the base model does; at 200
they do on every CPU tried, at some cost in time: the bar comes first.

With a chat model and no `--data` (`--model posttrain:smollm2-135m`, the real pretrained LLM), the
demonstrations are world additions asked in words with worked solutions in sentences (world/chat.py),
accuracy reads the reply's answer by convention, and what the model loses is measured on requests outside
the task (chat_world.GeneralProbe: the NLL of the start model's own replies, `general_nll`); only the first
variant trains, as the old-skill probes and replay rows are the embedded world's.

With `--data FILE.jsonl` (prompt/completion or messages records) the run fine-tunes on that data
with the first variant only (there are no old-skill probes to compare variants on, and replay and
rehearsal need world prompts); a seeded 10% of the records are held out, at most `eval_problems` of them
evaluated. The headline is `heldout_nll`, the mean NLL per completion token of the held-out completions
(teacher-forced: it moves with every token learned); `accuracy`, exact match of the greedy completion, is
secondary, as free text is rarely reproduced character for character. samples.jsonl holds the greedy
completions beside their references.

    posttrain sft --output-dir runs/sft
    posttrain sft variants=plain,l2sp:0.01,l2sp:0.03,replay:0.3,rehearse:0.2
    posttrain sft --model Qwen/Qwen2.5-0.5B --data my.jsonl steps=500 lr=2e-5 variants=plain
"""
from __future__ import annotations

import dataclasses
import itertools
from functools import partial

import torch
import torch.nn.functional as F

from posttrain.chat_world import (CHAT_MAX_NEW_TOKENS, CHAT_WORKED_TOKENS, GeneralProbe, held_out_accuracy,
                                  training_pairs, uses_chat_world)
from posttrain.config import check_choice, check_choices
from posttrain.data import EncodedDataset, RowLimit, encode_pair, encode_rows, has_chat_template
from posttrain.errors import UserError
from posttrain.evaluation import completion_nll, max_new_tokens_for
from posttrain.forward import causal_lm_loss
from posttrain.generation import generate
from posttrain.losses.sft import IGNORE, l2sp_penalty
from posttrain.methods.common import (eval_skill, headline, prepare_output, resumable, save_model, world_examples,
                                      write_samples, write_summary)
from posttrain.models import DEFAULT_MODEL, load_model
from posttrain.records import read_sft, split_records
from posttrain.report.finetuning_plots import frontier, grouped_bars
from posttrain.report.plots import training_curve
from posttrain.training import TrainingConfig, TrainResult, train
from posttrain.world import EASY_DIFFICULTY, FORMATS, MAIN_SKILL, SKILLS, render, sample_problems

FORGOTTEN = 0.05  # an old-skill accuracy drop of at least this much counts as forgetting
TARGET_TOLERANCE = 0.03  # a mitigation may cost this much target accuracy and still count as "best"


@dataclasses.dataclass
class SFTConfig(TrainingConfig):
    model: str = DEFAULT_MODEL  # embedded model name, local folder or hub id
    data: str | None = None  # JSONL of prompt/completion (or messages) records; default: world problems
    output_dir: str = "runs/sft"  # where summary.json, metrics.jsonl, plots and the model go
    skill: str = MAIN_SKILL  # world skill to fine-tune on
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [3])  # digits of training and test problems
    format: str = "cot"  # solution format of the demonstrations: cot | direct | instruction
    train_examples: int = 4000  # demonstrations drawn from the train split
    slip_rate: float = 0.0  # share of CoT addition demonstrations that forget a column-10 carry (world/flaws.py)
    eval_problems: int = 500  # held-out test problems for accuracy before and after
    old_skills: list[str] = dataclasses.field(default_factory=lambda: ["sub", "compare", "reverse", "sort"])  # forgetting
    old_skill_problems: int = 100  # test problems per old skill
    variants: list[str] = dataclasses.field(  # each from the base: plain | l2sp:S | replay:F | rehearse:F
        default_factory=lambda: ["plain", "l2sp:0.003", "l2sp:0.01", "replay:0.4", "rehearse:0.4"])
    eval_every: int = 0  # steps between held-out accuracy checks of the first variant (0: only at the end)
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20

    def validate(self) -> None:
        super().validate()
        check_choice("skill", self.skill, SKILLS)
        check_choices("old_skills", self.old_skills, SKILLS)
        check_choice("format", self.format, FORMATS)
        if not 0 <= self.slip_rate < 1:
            raise UserError(f"slip_rate must be in [0, 1), got {self.slip_rate}")
        if not self.variants:
            raise UserError("variants must name at least one variant, e.g. variants=plain")
        kinds = [parse_variant(v)[0] for v in self.variants]
        if self.data and kinds[0] in REPLAYS:
            raise UserError(f"{kinds[0]} mixes in world old-skill problems, which --data runs do not have; "
                            "lead with plain or l2sp:S")


CONFIG = SFTConfig
# --quick: a smoke-sized run for tests and the quick demonstration. Its L2-SP strength is 0.01: in 60 steps
# the quick model learns the target slowly, and a stronger pull (0.03) can keep it from learning the target at all.
QUICK = {"model": "posttrain:tiny-quick", "difficulties": "2", "steps": 60, "train_examples": 1000, "eval_problems": 100,
         "old_skill_problems": 50, "variants": "plain,l2sp:0.01,replay:0.3,rehearse:0.3"}


# The real pretrained chat model: worked 2-digit additions in sentences, the plain variant only (the
# forgetting probe of a chat model is chat_world.GeneralProbe), sized to the real-model track's 15 minutes.
PRESETS = {"posttrain:smollm2-135m": {
    "difficulties": "2", "variants": "plain", "train_examples": 2000, "steps": 30, "batch_size": 16, "lr": 1e-4,
    "warmup_steps": 3, "eval_problems": 300,
}}

# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's SFTConfig learning rate
# (trl/trainer/sft_config.py); the other settings keep their meaning here, which is not TRL's per-device one.
LARGE_MODEL = {"lr": 2e-5}

def old_skill_training_problems(cfg: SFTConfig, n: int) -> list:
    """About `n` old-skill training problems, shared equally by the old skills, at each one's easy difficulty."""
    per_skill = -(-n // len(cfg.old_skills))
    return [p for skill in cfg.old_skills
            for p in sample_problems(skill, EASY_DIFFICULTY[skill], per_skill, "train", cfg.seed, distinct=False)]


def replay_rows(cfg: SFTConfig, n: int) -> list[tuple[str, str]]:
    """About `n` old-skill training pairs, the world's solutions in direct and CoT format by turns."""
    return [render(p, fmt) for p, fmt in zip(old_skill_training_problems(cfg, n), itertools.cycle(("direct", "cot")))]


def rehearsal_rows(cfg: SFTConfig, n: int, base_model, tokenizer) -> list[tuple[str, str]]:
    """About `n` old-skill prompts with the base model's greedy answers (those it finished), right or wrong:
    the rows ask the model to keep behaving as the base did, not to get better at the old skills."""
    problems = old_skill_training_problems(cfg, n)
    prompts = [render(p)[0] for p in problems]
    budget = max_new_tokens_for(tokenizer, problems)  # room for a worked (CoT) answer: the base may write one
    answers = generate(base_model, tokenizer, prompts, max_new_tokens=budget)
    rows = [(p, text) for p, text, done in zip(prompts, answers.texts, answers.stopped) if done]
    if not rows:
        raise UserError(f"rehearse: the base model finished none of its {len(prompts)} old-skill answers within "
                        f"{budget} tokens, so there is nothing of its own to rehearse; use replay:F instead")
    return rows


def concat_batches(a: dict, b: dict, pad_id: int) -> dict:
    """Stack two right-padded batches into one, padding the narrower to the wider's length."""
    fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0}
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    return {k: torch.cat([F.pad(x[k], (0, width - x[k].shape[1]), value=v) for x in (a, b)]) for k, v in fill.items()}


@dataclasses.dataclass
class VariantSetup:
    """What a defence builds its batches and loss from. `base_model` is the model before training (rehearsal
    asks it for its answers); `anchors` its weights (L2-SP pulls toward them)."""
    cfg: SFTConfig
    target: EncodedDataset
    base_model: object
    tokenizer: object
    anchors: dict | None


# A defence: (setup, its value from the variant's spec) -> (batch_fn(step) -> batch, loss_fn(model, batch)).
# Every defence trains on the same target batches: those that show old-skill rows add them to the target rows.

def plain(setup: VariantSetup, _value: float):
    """loss = -1/N sum_t log pi(y_t | x, y_<t) over the target batch's completion tokens."""
    return setup.target.batch, causal_lm_loss


def l2sp(setup: VariantSetup, strength: float):
    """loss = plain + S/2 * ||theta - theta_0||^2 (L2-SP, Li et al. 2018, Eq. 3): a pull toward the base."""
    def loss_fn(model, batch):
        loss, metrics = causal_lm_loss(model, batch)
        penalty = l2sp_penalty(model, setup.anchors, strength)
        return loss + penalty, {**metrics, "l2sp": penalty.item()}

    return setup.target.batch, loss_fn


def replay(setup: VariantSetup, fraction: float):
    """plain, on batches where a fraction F of the rows are the world's old-skill examples (rehearsal)."""
    return with_old_skill_rows(setup, fraction, lambda n: replay_rows(setup.cfg, n)), causal_lm_loss


def rehearse(setup: VariantSetup, fraction: float):
    """replay with the base model's own greedy answers to old-skill prompts as those rows (pseudo-rehearsal,
    Robins 1995): it needs the old prompts, not the old training data."""
    rows = lambda n: rehearsal_rows(setup.cfg, n, setup.base_model, setup.tokenizer)  # noqa: E731
    return with_old_skill_rows(setup, fraction, rows), causal_lm_loss


def with_old_skill_rows(setup: VariantSetup, fraction: float, make_rows):
    """batch_fn: the step's target batch, plus enough rows of `make_rows(n)` to be `fraction` of the batch."""
    cfg, tokenizer = setup.cfg, setup.tokenizer
    per_batch = max(1, round(cfg.batch_size * fraction / (1 - fraction)))  # F of the rows in each batch
    n = per_batch * cfg.steps // 2  # each old-skill example seen about twice
    pairs = make_rows(n)
    old = EncodedDataset([encode_pair(tokenizer, *p) for p in pairs], tokenizer.pad_token_id, per_batch, cfg.seed)
    return lambda step: concat_batches(setup.target.batch(step), old.batch(step), tokenizer.pad_token_id)


DEFENCES = {"plain": plain, "l2sp": l2sp, "replay": replay, "rehearse": rehearse}
VALUES = {"plain": None, "l2sp": "STRENGTH", "replay": "FRACTION", "rehearse": "FRACTION"}  # what each one's :VALUE is
REPLAYS = ("replay", "rehearse")  # the defences that mix old-skill rows into the batches


def parse_variant(spec: str) -> tuple[str, float]:
    """`plain` -> ("plain", 0); `l2sp:0.01` -> ("l2sp", 0.01); `replay:0.2` -> ("replay", 0.2).
    A STRENGTH is > 0, a FRACTION in (0, 1); `plain` takes no value."""
    kind, _, value = spec.partition(":")
    try:
        number = float(value) if value else 0.0
    except ValueError:
        number = float("nan")
    takes = VALUES.get(kind, "unknown")
    valid = {None: not value, "STRENGTH": number > 0, "FRACTION": 0 < number < 1}.get(takes, False)
    if not valid:
        raise UserError(f"variant '{spec}': expected plain, l2sp:STRENGTH (> 0), replay:FRACTION or "
                        "rehearse:FRACTION (FRACTION in (0, 1))")
    return kind, number


def evaluate_world(model, tokenizer, cfg: SFTConfig) -> dict:
    """Main-task accuracy and accuracy on each old skill (the forgetting probe)."""
    main = eval_skill(model, tokenizer, cfg.skill, cfg.difficulties, cfg.eval_problems, cfg.format, cfg.seed)
    old = {s: eval_skill(model, tokenizer, s, EASY_DIFFICULTY[s], cfg.old_skill_problems, "direct", cfg.seed)["accuracy"]
           for s in cfg.old_skills}
    return {**headline(main), "old_skills": old, "_main": main}


def evaluate_records(model, tokenizer, records) -> dict:
    """Held-out user records: `heldout_nll`, the mean NLL per completion token of their completions
    (evaluation.completion_nll), the headline; and `accuracy`, exact match of greedy completions, which free
    text rarely reaches. `_main` keeps the greedy completions with their references, for samples.jsonl."""
    prompts, references = [prompt_of(r) for r in records], [r.completion for r in records]
    budget = max(len(tokenizer(c)["input_ids"]) for c in references) + 8
    texts = generate(model, tokenizer, prompts, max_new_tokens=budget,
                     desc=f"greedy answers to {len(prompts)} held-out records").texts
    correct = [t.strip() == c.strip() for t, c in zip(texts, references)]
    return {"heldout_nll": completion_nll(model, tokenizer, list(zip(prompts, references))),
            "accuracy": sum(correct) / len(correct), "n": len(correct),
            "_main": {"prompts": prompts, "completions": texts, "references": references, "correct": correct}}


def evaluate_chat(model, tokenizer, cfg: SFTConfig, probe: GeneralProbe) -> dict:
    """A chat model's held-out accuracy on world additions asked as requests, and the NLL of the start model's
    replies to general requests (chat_world.GeneralProbe: what it loses outside the task)."""
    worked = cfg.format == "cot"
    budget = CHAT_WORKED_TOKENS if worked else CHAT_MAX_NEW_TOKENS
    main = held_out_accuracy(model, tokenizer, cfg.difficulties, cfg.eval_problems, cfg.seed, worked, budget)
    return {**headline(main), **probe.nll(model, tokenizer.pad_token_id), "_main": main}


def prompt_of(record):
    """A record's prompt: its text, or its earlier chat turns for messages-format records."""
    return record.messages if record.messages is not None else record.prompt


def forgetting_entry(after: dict, baseline: dict) -> dict:
    """One variant's row of metrics.forgetting: target accuracy, old-skill accuracy, drop from the base."""
    drop = {s: baseline["old_skills"][s] - acc for s, acc in after["old_skills"].items()}
    return {"target_accuracy": after["accuracy"], "old_skills": after["old_skills"], "drop": drop,
            "mean_old_accuracy": sum(after["old_skills"].values()) / len(drop),
            "mean_drop": sum(drop.values()) / len(drop), "weight_shift": after["weight_shift"]}


def best_mitigation(forgetting: dict) -> dict | None:
    """The variant keeping the least of plain SFT's forgetting, among those within TARGET_TOLERANCE of its
    target accuracy. `kept_drop`: the largest share of plain SFT's drop the variant keeps, over the skills
    plain SFT forgot (0: nothing forgotten, 1: as much as plain SFT; gains count as 0)."""
    plain = forgetting.get("plain")
    if not plain:
        return None
    forgotten = [s for s, d in plain["drop"].items() if d >= FORGOTTEN]
    candidates = [v for v, f in forgetting.items()
                  if v != "plain" and f["target_accuracy"] >= plain["target_accuracy"] - TARGET_TOLERANCE]
    if not forgotten or not candidates:
        return None
    kept = {v: max(max(forgetting[v]["drop"][s], 0.0) / plain["drop"][s] for s in forgotten) for v in candidates}
    best = min(kept, key=kept.get)
    return {"variant": best, "kept_drop": kept[best], "forgotten_skills": forgotten,
            "target_loss": plain["target_accuracy"] - forgetting[best]["target_accuracy"]}


def train_variant(cfg: SFTConfig, spec: str, folder, target: EncodedDataset, evaluate_fn, resume: bool,
                  headline_run: bool) -> dict:
    """Train one variant from the base model into `folder`; returns its evaluation and timing."""
    kind, value = parse_variant(spec)
    model, tokenizer = load_model(cfg.model)
    # The base weights: L2-SP's anchor, and the origin of the weight shift reported for world runs.
    # (A user's large model on --data skips this copy unless L2-SP needs it.)
    anchors = None
    if kind == "l2sp" or not cfg.data:
        anchors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    eval_fn = None
    if headline_run and cfg.eval_every and not cfg.data and not has_chat_template(tokenizer):  # world runs only
        eval_fn = lambda step: {"eval_accuracy": eval_skill(  # noqa: E731
            model, tokenizer, cfg.skill, cfg.difficulties, cfg.eval_problems, cfg.format, cfg.seed)["accuracy"]}
    setup = VariantSetup(cfg, target, model, tokenizer, anchors)  # before training: `model` is still the base
    batches, loss_fn = DEFENCES[kind](setup, value)
    result = train(model, batches, loss_fn, cfg, folder,
                   resume=resume, eval_fn=eval_fn, eval_every=cfg.eval_every, desc=f"sft {spec}")
    after = evaluate_fn(model)
    if anchors:
        after["weight_shift"] = l2sp_penalty(model, anchors, 2.0).sqrt().item()  # ||theta - theta_0||_2
    training_curve(result.history, folder / "training_curve.png", f"SFT ({spec}) on {cfg.data or cfg.skill}",
                   eval_metric="eval_accuracy" if eval_fn else None)
    if headline_run:
        save_model(model, tokenizer, folder / "model")
        if "_main" in after:
            write_samples(folder / "samples.jsonl", after["_main"])
    after.pop("_main", None)
    return {"after": after, "time_s": result.time_s, "tokens_per_s": result.tokens_per_s}


# The config keys only world runs read: a --data run's summary leaves them out.
WORLD_KEYS = ("skill", "difficulties", "format", "train_examples", "slip_rate", "old_skills", "old_skill_problems",
              "eval_every")


def run(cfg: SFTConfig, resume: bool = False) -> dict:
    records = read_sft(cfg.data) if cfg.data else None  # bad data fails before anything slow
    out = prepare_output(cfg.output_dir, resume)
    model, tokenizer = load_model(cfg.model)
    chat = uses_chat_world(tokenizer, cfg.data)
    if records:
        records, held_out = split_records(records, cfg.seed, cfg.eval_problems)
        pairs = [(prompt_of(r), r.completion) for r in records]
        evaluate_fn = lambda m: evaluate_records(m, tokenizer, held_out)  # noqa: E731
    elif chat:
        pairs = training_pairs(cfg.difficulties, cfg.train_examples, cfg.seed, worked=cfg.format == "cot")
        probe = GeneralProbe.of(model, tokenizer)  # the start model's replies outside the task
        evaluate_fn = lambda m: evaluate_chat(m, tokenizer, cfg, probe)  # noqa: E731
    else:
        pairs = world_examples(cfg.skill, cfg.difficulties, cfg.train_examples, cfg.format, cfg.seed, cfg.slip_rate)
        evaluate_fn = lambda m: evaluate_world(m, tokenizer, cfg)  # noqa: E731

    # encoded before the baseline's evaluation: a record the tokenizer cannot take fails before anything slow
    encoded = encode_rows(tokenizer, pairs, RowLimit.of(cfg, model))
    target = EncodedDataset(encoded.rows, tokenizer.pad_token_id, cfg.batch_size, cfg.seed)
    baseline = evaluate_fn(model)
    baseline.pop("_main", None)
    variants = cfg.variants[:1] if records or chat else cfg.variants  # old-skill probes: the embedded world's
    runs = {}
    for i, spec in enumerate(variants):  # a finished variant leaves variant.json: --resume skips it
        folder = out if i == 0 else out / "variants" / spec.replace(":", "-")
        continue_training = resume and (i == 0 or (folder / "checkpoint").exists())  # later ones may not have started
        runs[spec] = resumable(folder / "variant.json", resume, partial(
            train_variant, cfg, spec, folder, target, evaluate_fn, continue_training, headline_run=i == 0))
    first = runs[variants[0]]
    metrics = {**first["after"], "train_examples": len(target), "train_tokens": target.tokens(), **encoded.counts,
               "variant_time_s": {spec: r["time_s"] for spec, r in runs.items()}}
    if not (records or chat):
        forgetting = {spec: forgetting_entry(r["after"], baseline) for spec, r in runs.items()}
        metrics["forgetting"] = forgetting
        metrics["best_mitigation"] = best_mitigation(forgetting)
        metrics.pop("old_skills")  # per variant in metrics.forgetting
        plot_forgetting(cfg, baseline, forgetting, out)
    timing = TrainResult([], {}, sum(r["time_s"] for r in runs.values()), first["tokens_per_s"])  # all variants
    return write_summary(out, "sft", cfg, metrics, baseline, model, timing, unread=WORLD_KEYS if records else (),
                         model_dir=str(out / "model"))


def plot_forgetting(cfg: SFTConfig, baseline: dict, forgetting: dict, out) -> None:
    """frontier.png (old-skill vs target accuracy per variant) and accuracy_by_skill.png (per skill)."""
    base_old = sum(baseline["old_skills"].values()) / len(baseline["old_skills"])
    frontier({v: (f["target_accuracy"], f["mean_old_accuracy"]) for v, f in forgetting.items()},
             (baseline["accuracy"], base_old), out / "frontier.png",
             f"Adaptation vs forgetting: SFT on {cfg.skill} {cfg.difficulties} digits")
    series = {"base": {cfg.skill: baseline["accuracy"], **baseline["old_skills"]}}
    series.update({v: {cfg.skill: f["target_accuracy"], **f["old_skills"]} for v, f in forgetting.items()})
    grouped_bars(series, out / "accuracy_by_skill.png", "Held-out accuracy per skill, base and after each variant")
