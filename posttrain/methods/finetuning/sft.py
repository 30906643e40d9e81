"""Supervised fine-tuning (SFT): maximise log p(completion | prompt) on demonstrations.

    loss = -1/N sum_t log pi(y_t | x, y_<t)      over completion tokens (EOS included), N of them
         + l2sp/2 * ||theta - theta_0||^2         optional: L2-SP, stay near the pretrained weights

By default the demonstrations are the world's main task (multi-digit addition) at a difficulty the
base model fails, written as chain-of-thought solutions. SFT lifts held-out accuracy on that task;
the price can be forgetting of skills the base model had, which this run measures on the other
skills (accuracy before and after). Two mitigations are options: L2-SP (`l2sp=STRENGTH`) and replay
(`replay_fraction=F`: a fraction F of the training rows are old-skill examples).

With `--data FILE.jsonl` (prompt/completion or messages records) the run fine-tunes on that data
instead; 10% of the records are held out and accuracy is exact match of the greedy completion.

    posttrain sft --output-dir runs/sft
    posttrain sft --model Qwen/Qwen2.5-0.5B --data my.jsonl steps=500 lr=2e-5
"""
from __future__ import annotations

import dataclasses
import random

from posttrain.data import EncodedDataset, encode_pair
from posttrain.errors import UserError
from posttrain.generation import generate
from posttrain.losses.sft import causal_lm_loss, l2sp_penalty
from posttrain.methods.common import eval_skill, headline, prepare_output, save_model, world_examples, write_samples, write_summary
from posttrain.models import DEFAULT_MODEL, load_model
from posttrain.records import read_sft
from posttrain.report.plots import before_after_bars, training_curve
from posttrain.training import TrainingConfig, train
from posttrain.world import EASY_DIFFICULTY, FORMATS, MAIN_SKILL, SKILLS


@dataclasses.dataclass
class SFTConfig(TrainingConfig):
    model: str = DEFAULT_MODEL  # embedded model name, local folder or hub id
    data: str | None = None  # JSONL of prompt/completion (or messages) records; default: world problems
    output_dir: str = "runs/sft"  # where summary.json, metrics.jsonl, plots and the model go
    skill: str = MAIN_SKILL  # world skill to fine-tune on
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [3])  # digits of training and test problems
    format: str = "cot"  # solution format of the demonstrations: cot | direct | instruction
    train_examples: int = 4000  # demonstrations drawn from the train split
    eval_problems: int = 500  # held-out test problems for accuracy before and after
    old_skills: list[str] = dataclasses.field(default_factory=lambda: ["sub", "compare", "reverse", "sort"])  # forgetting
    old_skill_problems: int = 200  # test problems per old skill
    l2sp: float = 0.0  # L2-SP strength toward the pretrained weights (0: off)
    replay_fraction: float = 0.0  # fraction of training rows that replay old skills (0: off)
    eval_every: int = 0  # steps between held-out accuracy checks during training (0: only at the end)
    steps: int = 250
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20

    def validate(self) -> None:
        super().validate()
        if self.skill not in SKILLS or any(s not in SKILLS for s in self.old_skills):
            raise UserError(f"skills must be among {', '.join(SKILLS)}")
        if self.format not in FORMATS:
            raise UserError(f"format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if not 0 <= self.replay_fraction < 1:
            raise UserError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.l2sp < 0:
            raise UserError(f"l2sp must be >= 0, got {self.l2sp}")


CONFIG = SFTConfig
# --quick: a smoke-sized run for tests and the quick demonstration.
QUICK = {"steps": 60, "train_examples": 1000, "eval_problems": 100, "old_skill_problems": 50}


def training_rows(cfg: SFTConfig) -> list[tuple[str, str]]:
    """World demonstrations, plus old-skill rows when replay is on (a fraction of all rows)."""
    rows = world_examples(cfg.skill, cfg.difficulties, cfg.train_examples, cfg.format, cfg.seed)
    n_replay = round(cfg.train_examples * cfg.replay_fraction / (1 - cfg.replay_fraction))
    rng = random.Random(cfg.seed + 1)
    for i in range(n_replay):
        skill = cfg.old_skills[i % len(cfg.old_skills)]
        rows += world_examples(skill, EASY_DIFFICULTY[skill], 1, rng.choice(["direct", "cot"]), cfg.seed * 100_003 + i)
    return rows


def evaluate_world(model, tokenizer, cfg: SFTConfig) -> dict:
    """Main-task accuracy and accuracy on each old skill (the forgetting probe)."""
    main = eval_skill(model, tokenizer, cfg.skill, cfg.difficulties, cfg.eval_problems, cfg.format, cfg.seed)
    old = {s: eval_skill(model, tokenizer, s, EASY_DIFFICULTY[s], cfg.old_skill_problems, "direct", cfg.seed)["accuracy"]
           for s in cfg.old_skills}
    return {**headline(main), "old_skills": old, "_main": main}


def evaluate_records(model, tokenizer, records) -> dict:
    """Exact-match accuracy of greedy completions on held-out user records."""
    budget = max(len(tokenizer(r.completion)["input_ids"]) for r in records) + 8
    texts = generate(model, tokenizer, [prompt_of(r) for r in records], max_new_tokens=budget).texts
    correct = [t.strip() == r.completion.strip() for t, r in zip(texts, records)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct)}


def prompt_of(record):
    """A record's prompt: its text, or its earlier chat turns for messages-format records."""
    return record.messages if record.messages is not None else record.prompt


def split_records(records: list, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded 10% held out, at least one record (reused for training if alone)."""
    records = records[:]
    random.Random(seed).shuffle(records)
    n_held = max(1, len(records) // 10)
    return records[n_held:] or records, records[:n_held]


def run(cfg: SFTConfig, resume: bool = False) -> dict:
    records = read_sft(cfg.data) if cfg.data else None  # bad data fails before anything slow
    out = prepare_output(cfg.output_dir, resume)
    model, tokenizer = load_model(cfg.model)
    if records:
        records, held_out = split_records(records, cfg.seed)
        pairs = [(prompt_of(r), r.completion) for r in records]
        evaluate_fn = lambda m: evaluate_records(m, tokenizer, held_out)  # noqa: E731
    else:
        pairs = training_rows(cfg)
        evaluate_fn = lambda m: evaluate_world(m, tokenizer, cfg)  # noqa: E731

    baseline = evaluate_fn(model)
    dataset = EncodedDataset([encode_pair(tokenizer, *p) for p in pairs], tokenizer.pad_token_id, cfg.batch_size, cfg.seed)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg.l2sp else {}

    def loss_fn(model, batch):
        loss, metrics = causal_lm_loss(model, batch)
        if anchors:
            penalty = l2sp_penalty(model, anchors, cfg.l2sp)
            loss, metrics = loss + penalty, {**metrics, "l2sp": penalty.item()}
        return loss, metrics

    result = train(model, dataset.batch, loss_fn, cfg, out, resume=resume, desc="sft")
    after = evaluate_fn(model)
    save_model(model, tokenizer, out / "model")
    training_curve(result.history, out / "training_curve.png", f"SFT on {cfg.data or cfg.skill}")

    extra = {}
    if not cfg.data:
        extra["forgetting"] = {s: {"before": baseline["old_skills"][s], "after": after["old_skills"][s],
                                   "drop": baseline["old_skills"][s] - after["old_skills"][s]} for s in cfg.old_skills}
        before_after_bars({cfg.skill: (baseline["accuracy"], after["accuracy"]),
                           **{s: (v["before"], v["after"]) for s, v in extra["forgetting"].items()}},
                          out / "accuracy_by_skill.png", "Held-out accuracy before and after SFT")
        write_samples(out / "samples.jsonl", after.pop("_main"))
        baseline.pop("_main")
    metrics = {**after, **extra, "train_examples": len(dataset), "train_tokens": dataset.tokens()}
    return write_summary(out, "sft", cfg, metrics, baseline, model, result, model_dir=str(out / "model"))

