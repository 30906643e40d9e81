"""Knowledge distillation: teach a small student what a larger teacher knows.

Four students of the same size start from the same base model and see the same training prompts
for the same number of steps; only what they learn from differs:

    sft        the reference solutions (plain SFT; no teacher)
    seq_kd     the teacher's own completions (sequence-level KD, Kim & Rush 2016): SFT on teacher outputs
    soft_kd    the teacher's next-token distributions on the reference solutions (word-level KD,
               Hinton et al. 2015): loss = tau^2 KL(p_teacher^tau || q_student^tau) per token
    on_policy  the teacher's next-token distributions on sequences the student writes itself (GKD,
               Agarwal et al. 2024): each step, half the batch's rows are the student's own completions
               of their prompts (temperature 1; sampled every 5 steps, for those 5 steps at once), the
               rest the references; loss tau^2 KL(q_student^tau || p_teacher^tau) per token (reverse KL,
               mode-seeking)

    loss_soft_kd = tau^2 / N sum_t sum_v p_T(v | x, y_<t; tau) log(p_T(v | .; tau) / q_S(v | .; tau))

(The divergences live in `posttrain/losses/distill.py`; `divergence` and `on_policy_divergence` pick
forward_kl or reverse_kl.) The teacher is chain-of-thought SFT of the embedded tiny model on 3-digit
addition (a `posttrain sft` run with the recipe in TEACHERS below, built once and cached: 0.90M
parameters, all but perfect on held-out problems); the student is the embedded `tiny-student` (0.21M parameters,
24% of the teacher's), pretrained on the same corpus with the same tokenizer, which logit
distillation needs (one vocabulary, one tokenization). The summary reports the teacher, the student
before training, the four students, and the share of the SFT student's gap to the teacher that each
distilled student closes (`gap_closed`: the on-policy student's, the headline; `gap_closed_by_student`).

What to expect here, and why. The teacher is all but certain of every token on training
sequences at tau = 1, and still confident at tau = 2, so its soft targets say little beyond the
reference at tau = 1 and are near-uniform noise at tau = 4; tau = 2 worked best. Its greedy completions
equal the reference solutions on every training prompt (`seq_kd_data`), so sequence-level KD trains on
the very same sequences as SFT and ends where SFT ends: on a task with one correct derivation, a perfect
teacher's samples add nothing. Soft targets on the references help a little when prompts are few (the
default is 50: from 100 the student learns 3-digit addition almost alone). A student trained only on the
references never sees its own mistakes, and at test time it continues its own prefixes, wrong carries
included; on its own samples the teacher says, at every position the student reaches, what comes next.
So the on-policy student gains most over SFT; soft targets a little, and not because of the divergence
(reverse KL on the references does as well as forward KL there). Sampling fresh rows at every step
costs several times the training time of soft targets, most of it the sampling passes, whose time goes
per generated token, not per row; sampling five steps' rows in one pass every five steps
(`sample_every=5`, the default; rows up to 4 steps old) costs less than half as much and lands inside
the spread between seeds of sampling every step. On the smoke-sized quick student, which reads digits
poorly, reverse KL collapses to one prompt-independent solution ("9+9+0=11, ..." for every prompt):
mode-seeking picks a single mode where the student cannot represent the teacher's prompt-dependent
one. Forward KL does not, so QUICK uses it. How far a student gets
in 150 steps depends on the seed (the batch order): `seeds=0,1,2` trains every student once per seed and
reports the means.

    posttrain distill --output-dir runs/distill
    posttrain distill seeds=0,1,2 temperature=2 on_policy_divergence=forward_kl on_policy_fraction=1
    posttrain distill sample_every=1    # the on-policy student samples fresh rows at every step

With `--data FILE.jsonl` (prompt/completion or messages records, as `posttrain sft` reads them) the
students learn the records' prompts instead of world problems: `sft` the records' completions, `seq_kd`
the teacher's greedy completions of the same prompts, `soft_kd` and `on_policy` the teacher's
distributions. A tenth of the records is held out, and accuracy is exact match of greedy completions
(as in `posttrain sft --data`), for the teacher, the student base and every student. The teacher and the
student must share one tokenizer:

    posttrain distill --data my.jsonl teacher=./my-sft-model --model Qwen/Qwen2.5-0.5B steps=500 lr=2e-5
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from posttrain.config import check_choice
from posttrain.data import EncodedDataset, encode_pair, pad_batch
from posttrain.errors import UserError
from posttrain.forward import causal_lm_loss, labelled_logits
from posttrain.generation import generate
from posttrain.losses.distill import DIVERGENCES
from posttrain.methods import is_users_model
from posttrain.methods.common import eval_skill, headline, prepare_output, resumable, world_examples, write_summary
from posttrain.methods.finetuning.sft import evaluate_records, prompt_of
from posttrain.models import count_params, load_model
from posttrain.records import read_sft, split_records
from posttrain.rollouts import sample_rollouts
from posttrain.report.distill_plots import student_bars
from posttrain.report.plots import training_curve
from posttrain.training import CHECKPOINT, TrainingConfig, TrainResult, make_accelerator, shard_frozen, train
from posttrain.world import FORMATS, MAIN_SKILL, SKILLS, extract_answer, verify

# Teachers by name: `posttrain sft` runs (built once, then cached) whose model is the teacher. The
# recipe is spelled out so that changes to sft's defaults do not silently change the teacher.
TEACHERS = {
    # chain-of-thought SFT of posttrain:tiny on 3-digit addition (near perfect on held-out problems)
    "sft-teacher": ["variants=plain", "difficulties=3", "format=cot", "train_examples=4000", "steps=250", "lr=1e-3",
                    "eval_problems=300", "old_skill_problems=20"],
    # its smoke-sized twin on posttrain:tiny-quick at 2 digits, for --quick runs
    "sft-teacher-quick": ["model=posttrain:tiny-quick", "variants=plain", "difficulties=2", "format=cot",
                          "train_examples=1000", "steps=120", "lr=3e-3", "eval_problems=100", "old_skill_problems=20"],
}


@dataclasses.dataclass
class DistillConfig(TrainingConfig):
    teacher: str = "sft-teacher"  # sft-teacher (cached CoT SFT model), sft-teacher-quick, a model folder or hub id
    model: str = "posttrain:tiny-student"  # the student's base: embedded name, folder or hub id (teacher's tokenizer)
    data: str | None = None  # JSONL of prompt/completion (or messages) records (a tenth held out); default: world
    output_dir: str = "runs/distill"  # where summary.json, plots and the students' files go
    skill: str = MAIN_SKILL  # world skill of the prompts
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [3])  # digits of training and test problems
    format: str = "cot"  # solution format: cot | direct | instruction
    prompts: int = 50  # training prompts, the same for every student (with data: every training record)
    eval_problems: int = 300  # held-out test problems
    temperature: float = 2.0  # tau of soft-target distillation
    divergence: str = "forward_kl"  # forward_kl | reverse_kl
    on_policy_divergence: str = "reverse_kl"  # of the on-policy student: forward_kl | reverse_kl
    on_policy_fraction: float = 0.5  # share of the on-policy student's rows that it samples itself
    sample_every: int = 5  # the on-policy student samples its rows of this many steps in one pass (1: every step)
    sample_temperature: float = 0.0  # teacher sampling for sequence-level KD (0: greedy)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # one training of every student per seed
    steps: int = 150
    batch_size: int = 32
    lr: float = 5e-3
    warmup_steps: int = 10

    def validate(self) -> None:
        super().validate()
        check_choice("skill", self.skill, SKILLS)
        check_choice("format", self.format, FORMATS)
        for name in ("divergence", "on_policy_divergence"):
            if getattr(self, name) not in DIVERGENCES:
                raise UserError(f"{name} must be one of {', '.join(DIVERGENCES)}, got '{getattr(self, name)}'")
        if self.temperature <= 0 or self.sample_temperature < 0:
            raise UserError("temperature must be > 0 and sample_temperature >= 0")
        if not self.seeds or self.prompts < 1:
            raise UserError("seeds must list at least one seed and prompts must be >= 1")
        if self.sample_every < 1:
            raise UserError(f"sample_every must be >= 1, got {self.sample_every}")
        if not 0 < self.on_policy_fraction <= 1:
            raise UserError(f"on_policy_fraction must be in (0, 1], got {self.on_policy_fraction}")


CONFIG = DistillConfig
# --quick: a smoke-sized run for tests and the quick demonstration: 2-digit addition, quick teacher and
# quick student, 200 prompts (with 100 steps or 50 prompts the students stay far below the teacher). The
# on-policy student uses forward KL here: with reverse KL this student collapses to one solution.
QUICK = {"teacher": "sft-teacher-quick", "model": "posttrain:tiny-student-quick", "difficulties": "2", "steps": 150,
         "prompts": 200, "lr": 5e-3, "eval_problems": 100, "on_policy_divergence": "forward_kl"}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's GKDConfig learning rate
# (trl/experimental/gkd: SFTConfig's, trl/trainer/sft_config.py; Agarwal et al.'s on-policy distillation).
LARGE_MODEL = {"lr": 2e-5}


class Recipe(NamedTuple):
    """What one student learns from: its training rows (a batch of them per step) and its loss; for the
    on-policy student also the rows' prompts, in row order, which it completes itself (`on_policy_batches`)."""

    data: EncodedDataset
    loss_fn: Callable
    on_policy_prompts: list[str] | None = None
    max_new_tokens: int = 0  # of the on-policy completions


def teacher_path(name: str) -> str:
    """A model name for load_model: the cached SFT run's model for a TEACHERS name, else `name` itself."""
    if name not in TEACHERS:
        return name
    from posttrain.stages import cached_run  # builds it on first use

    return str(cached_run("sft", TEACHERS[name]) / "model")


def load_pair(teacher_name: str, student_name: str):
    """(teacher, student base model, tokenizer), refusing a pair whose vocabularies differ."""
    teacher, tokenizer = load_model(teacher_name)
    student, student_tokenizer = load_model(student_name)
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"student '{student_name}' and teacher '{teacher_name}' have different vocabularies; "
                        "logit distillation needs one tokenizer")
    return teacher.eval().requires_grad_(False), student, tokenizer


def soft_kd_loss(teacher, cfg: DistillConfig, divergence: str):
    """loss_fn(student, batch): `divergence` between teacher and student on the batch's labelled tokens."""
    divergence = DIVERGENCES[divergence]

    def loss_fn(student, batch: dict):
        with torch.no_grad():  # both models' logits only where a label follows, the same N positions: (N, V)
            teacher_logits, _, _ = labelled_logits(teacher.to(batch["input_ids"].device), batch)
        student_logits, _, _ = labelled_logits(student, batch)
        return divergence(student_logits, teacher_logits, cfg.temperature)

    return loss_fn


def completion_budget(tokenizer, pairs: list[tuple[str, str]]) -> int:
    """New tokens to allow a model completing these prompts: the longest reference and 8 more."""
    return max(len(tokenizer(c)["input_ids"]) for _, c in pairs) + 8


def teacher_completions(teacher, tokenizer, pairs: list[tuple[str, str]], cfg: DistillConfig,
                        is_right: Callable[[str, str, str], bool]) -> tuple[list, dict]:
    """The teacher's completions of the training prompts, and how they compare with the references
    (`is_right(prompt, text, reference)`)."""
    prompts = [p for p, _ in pairs]
    texts = generate(teacher, tokenizer, prompts, max_new_tokens=completion_budget(tokenizer, pairs),
                     temperature=cfg.sample_temperature, seed=cfg.seed).texts
    right = [is_right(p, t, c) for t, (p, c) in zip(texts, pairs)]
    stats = {"teacher_sample_accuracy": sum(right) / len(texts),
             "identical_to_reference": sum(t.strip() == c.strip() for t, (_, c) in zip(texts, pairs)) / len(texts)}
    return list(zip(prompts, texts)), stats


def on_policy_batches(student, tokenizer, prompts: list[str], data: EncodedDataset, fraction: float,
                      max_new_tokens: int, seed: int, sample_every: int = 1):
    """batch_fn(step): `data`'s step-th batch in which the first `fraction` of the rows are replaced by the
    student's own completion of their prompt (temperature 1): GKD's mixture of on-policy sequences (where the
    student needs correcting) and fixed ones (which hold it on course).

    The student samples once every `sample_every` steps, the own rows of that step and of the steps up to the
    next sampling in one pass: on a model this small a pass costs about the same for 80 rows as for 16 (its
    time goes per generated token, not per row), so rows of a block's later steps come from weights up to
    `sample_every - 1` steps old. A run resumed inside a block samples the block's rest from the restored weights."""
    own_rows: dict[int, list] = {}  # step -> the student's own rows of that step, for the current block

    def own_picks(step: int) -> list[int]:
        picks = data.picks(step)
        return picks[: round(fraction * len(picks))]

    def sample_block(first: int) -> None:
        steps = range(first, (first // sample_every + 1) * sample_every)  # this step to the end of its block
        wanted = [(step, i) for step in steps for i in own_picks(step)]
        samples = sample_rollouts(student, tokenizer, [prompts[i] for _, i in wanted], num_samples=1,
                                  max_new_tokens=max_new_tokens, temperature=1.0, seed=seed * 1_000_003 + first)
        own_rows.clear()
        own_rows.update({step: [] for step in steps})
        for j, (step, _) in enumerate(wanted):
            own_rows[step].append(samples.row(j))

    def batch_fn(step: int) -> dict:
        if step not in own_rows:
            sample_block(step)
        own = own_rows[step]
        return pad_batch(own + [data.rows[i] for i in data.picks(step)[len(own):]], data.pad_id)

    return batch_fn


def train_student(kind: str, cfg: DistillConfig, recipe: Recipe, seed: int, out: Path, resume: bool,
                  evaluate: Callable[..., dict]) -> dict:
    """Train one student from the base model with `seed`; its held-out accuracy and training time."""
    student, tokenizer = load_model(cfg.model)
    data = EncodedDataset(recipe.data.rows, recipe.data.pad_id, cfg.batch_size, seed)  # the seed orders the batches
    batch_fn = data.batch
    if recipe.on_policy_prompts is not None:
        batch_fn = on_policy_batches(student, tokenizer, recipe.on_policy_prompts, data, cfg.on_policy_fraction,
                                     recipe.max_new_tokens, seed, cfg.sample_every)
    resume = resume and (out / CHECKPOINT / "state.json").exists()
    result = train(student, batch_fn, recipe.loss_fn, dataclasses.replace(cfg, seed=seed), out, resume=resume,
                   desc=f"{kind} seed {seed}", batch_reads_model=recipe.on_policy_prompts is not None)
    training_curve(result.history, out / "training_curve.png", f"{kind} student, seed {seed}")
    evaluation = evaluate(student)
    steps = {"step_accuracy": evaluation["step_accuracy"]} if "step_accuracy" in evaluation else {}  # world problems
    return {"accuracy": evaluation["accuracy"], **steps, "time_s": result.time_s, "tokens_per_s": result.tokens_per_s}


def world_task(cfg: DistillConfig, tokenizer) -> tuple[list, Callable, Callable]:
    """(training pairs, evaluate(model), is_right(prompt, text, reference)) of the world's problems."""
    pairs = world_examples(cfg.skill, cfg.difficulties, cfg.prompts, cfg.format, cfg.seed)
    evaluate = lambda model: headline(eval_skill(  # noqa: E731
        model, tokenizer, cfg.skill, cfg.difficulties, cfg.eval_problems, cfg.format, cfg.seed))
    return pairs, evaluate, lambda prompt, text, reference: verify(prompt, text, extract_answer(reference))


def records_task(records: list, cfg: DistillConfig, tokenizer) -> tuple[list, Callable, Callable]:
    """The same for a user's records: every training record, exact match on the held-out tenth."""
    train_records, held_out = split_records(records, cfg.seed)
    pairs = [(prompt_of(r), r.completion) for r in train_records]
    def evaluate(model) -> dict:
        result = evaluate_records(model, tokenizer, held_out)
        del result["_main"]  # the greedy completions, which sft writes to samples.jsonl: no summary holds them
        return result

    return pairs, evaluate, lambda prompt, text, reference: text.strip() == reference.strip()


def run(cfg: DistillConfig, resume: bool = False) -> dict:
    started = time.perf_counter()
    records = read_sft(cfg.data) if cfg.data else None  # bad data fails before anything slow
    if cfg.teacher in TEACHERS and is_users_model(cfg.model):  # before the teacher's stage is built
        raise UserError(f"distill: --model is your student, and teacher '{cfg.teacher}' is the embedded world's "
                        "model, whose tokenizer yours does not share: give teacher=FOLDER (a model with your tokenizer)")
    out = prepare_output(cfg.output_dir, resume)
    teacher_source = teacher_path(cfg.teacher)
    teacher, student_base, tokenizer = load_pair(teacher_source, cfg.model)
    task = records_task(records, cfg, tokenizer) if records else world_task(cfg, tokenizer)
    training_pairs, evaluate, is_right = task
    teacher_eval, baseline = evaluate(teacher), evaluate(student_base)

    teacher_pairs, sample_stats = teacher_completions(teacher, tokenizer, training_pairs, cfg, is_right)
    accelerator = make_accelerator(cfg.precision)  # from here on the teacher only runs forward: sharded under fsdp
    teacher = shard_frozen(teacher.to(accelerator.device), cfg, accelerator)
    encode = lambda pairs: EncodedDataset(  # noqa: E731
        [encode_pair(tokenizer, *p) for p in pairs], tokenizer.pad_token_id, cfg.batch_size, cfg.seed)
    references = encode(training_pairs)
    recipes = {
        "sft": Recipe(references, causal_lm_loss),
        "seq_kd": Recipe(encode(teacher_pairs), causal_lm_loss),
        "soft_kd": Recipe(references, soft_kd_loss(teacher, cfg, cfg.divergence)),
        "on_policy": Recipe(references, soft_kd_loss(teacher, cfg, cfg.on_policy_divergence),
                            [p for p, _ in training_pairs], completion_budget(tokenizer, training_pairs)),
    }
    students = {}
    for kind, recipe in recipes.items():
        runs = [resumable(out / kind / f"seed{seed}" / "result.json", resume,  # --resume skips finished students
                          lambda: train_student(kind, cfg, recipe, seed, out / kind / f"seed{seed}", resume, evaluate))
                for seed in cfg.seeds]
        accuracies = [r["accuracy"] for r in runs]
        students[kind] = {"accuracy": sum(accuracies) / len(accuracies), "per_seed": accuracies,
                          "time_s": sum(r["time_s"] for r in runs), "tokens_per_s": runs[-1]["tokens_per_s"]}
        if "step_accuracy" in runs[0]:  # world problems: the share of reasoning steps the checker accepts
            students[kind]["step_accuracy"] = [r["step_accuracy"] for r in runs]

    teacher_params, student_params = count_params(teacher)["total"], count_params(student_base)["total"]
    gap = teacher_eval["accuracy"] - students["sft"]["accuracy"]
    gap_closed = {kind: (students[kind]["accuracy"] - students["sft"]["accuracy"]) / gap if gap > 0 else None
                  for kind in ("seq_kd", "soft_kd", "on_policy")}
    metrics = {
        "accuracy": students["on_policy"]["accuracy"],  # the distilled student
        "students": students,
        "teacher": {"accuracy": teacher_eval["accuracy"], "params": teacher_params, "model": teacher_source},
        "student_params": student_params,
        "student_to_teacher_params": student_params / teacher_params,
        "gap_closed": gap_closed["on_policy"],
        "gap_closed_by_student": gap_closed,
        "seq_kd_data": sample_stats,
        "train_prompts": len(training_pairs),
        "run_time_s": time.perf_counter() - started,  # the whole run, evaluations and all students included
    }
    student_bars({"student base": baseline["accuracy"], **{k: v["accuracy"] for k, v in students.items()},
                  "teacher": teacher_eval["accuracy"]}, out / "students.png",
                 f"Held-out accuracy, {len(cfg.seeds)} seed(s) per student")
    distilled = TrainResult([], {}, students["on_policy"]["time_s"], students["on_policy"]["tokens_per_s"])
    return write_summary(out, "distill", cfg, metrics, baseline, student_base, distilled)
