"""Chain-of-thought fine-tuning: the same problems taught with their reasoning, or with the answer alone.

Two models are fine-tuned from the same base model on the same problems, with the same number of
examples and steps; only the completions differ:

    cot      Q: 3471+2859                  direct   Q: 3471+2859
             Let's think step by step.              A: 6330
             1+9+0=10, digits 0, carry 1
             7+5+1=13, digits 30, carry 1
             ...
             A: 6330

A direct answer has to produce every digit of the sum, carries included, from the prompt in one
token each; a chain of thought spends a line of tokens on each column, every line a computation
small enough for a tiny model (the "scratchpad" of Nye et al. 2021; chain of thought, Wei et al.
2022, here taught by fine-tuning rather than prompted). The gap grows with the number of digits,
so training and test problems mix difficulties and accuracy is reported per difficulty.

Reported: accuracy by difficulty for both models and the base model, the step accuracy of the
generated reasoning (fraction of written steps the step checker accepts, per difficulty), and where
the first wrong step falls (a histogram over step positions; a missing step counts as wrong).

    posttrain cot-ft --output-dir runs/cot-ft
    posttrain cot-ft difficulties=2,3,4 steps=300
"""
from __future__ import annotations

import dataclasses
from functools import partial

from posttrain.config import check_choice
from posttrain.data import EncodedDataset, encode_pair
from posttrain.errors import UserError
from posttrain.evaluation import evaluate
from posttrain.forward import causal_lm_loss
from posttrain.methods.common import headline, prepare_output, resumable, save_model, write_summary
from posttrain.models import DEFAULT_MODEL, load_model
from posttrain.report.finetuning_plots import accuracy_by_difficulty, first_error_histogram
from posttrain.report.plots import training_curve
from posttrain.training import TrainingConfig, TrainResult, train
from posttrain.world import MAIN_SKILL, SKILLS, check_steps, first_error, render, sample_problems

COMPARED = ("cot", "direct")  # completion formats, trained in this order


@dataclasses.dataclass
class CoTConfig(TrainingConfig):
    model: str = DEFAULT_MODEL  # embedded model name, local folder or hub id
    output_dir: str = "runs/cot-ft"  # where summary.json, plots and the two models go
    skill: str = MAIN_SKILL  # world skill to fine-tune on
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])  # digits, mixed in training and test
    train_examples: int = 4000  # training problems, the same for both formats
    eval_problems: int = 300  # held-out test problems, spread evenly over the difficulties
    steps: int = 250
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20

    def validate(self) -> None:
        super().validate()
        check_choice("skill", self.skill, SKILLS)
        if not self.difficulties or min(self.difficulties) < 1:
            raise UserError(f"difficulties must be a non-empty list of positive ints, got {self.difficulties}")


CONFIG = CoTConfig
# --quick: a smoke-sized run for tests, on the quick base model (at lr 1e-3 it needs far more steps to
# learn the 3-digit problems).
QUICK = {"model": "posttrain:tiny-quick", "difficulties": "2,3", "train_examples": 1000, "eval_problems": 100,
         "steps": 140, "lr": 3e-3}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's SFTConfig learning rate
# (trl/trainer/sft_config.py).
LARGE_MODEL = {"lr": 2e-5}


def step_report(problems, completions) -> dict:
    """Per difficulty: step accuracy of the written reasoning and a histogram of first-error positions.

    A chain that stops early is wrong at its first missing step, so "where it first went wrong"
    covers both wrong lines and skipped ones.
    """
    right, written, first_errors = {}, {}, {}
    for problem, completion in zip(problems, completions):
        labels = check_steps(problem, completion)
        d = problem.difficulty
        right[d] = right.get(d, 0) + sum(labels)
        written[d] = written.get(d, 0) + len(labels)
        labels += [False] * (len(problem.steps) - len(labels))  # missing steps are wrong steps
        position = first_error(labels)
        if position is not None:
            histogram = first_errors.setdefault(d, {})
            histogram[position] = histogram.get(position, 0) + 1
    return {"step_accuracy_by_difficulty": {d: right[d] / written[d] if written[d] else None for d in sorted(right)},
            "first_error": {d: dict(sorted(h.items())) for d, h in sorted(first_errors.items())}}


def train_format(cfg: CoTConfig, fmt: str, problems, test, folder, resume: bool) -> dict:
    """Fine-tune a fresh copy of the base model on `problems` written in `fmt`; evaluate on `test`."""
    model, tokenizer = load_model(cfg.model)
    rows = [encode_pair(tokenizer, *render(p, fmt)) for p in problems]
    dataset = EncodedDataset(rows, tokenizer.pad_token_id, cfg.batch_size, cfg.seed)
    result = train(model, dataset.batch, causal_lm_loss, cfg, folder, resume=resume, desc=f"cot-ft {fmt}")
    evaluation = evaluate(model, tokenizer, test, fmt=fmt)
    save_model(model, tokenizer, folder / "model")
    training_curve(result.history, folder / "training_curve.png", f"{fmt} fine-tuning on {cfg.skill}")
    steps = step_report(test, evaluation["completions"]) if fmt == "cot" else {}  # direct answers have no steps
    return {**headline(evaluation), **steps,
            "train_tokens": dataset.tokens(), "time_s": result.time_s, "tokens_per_s": result.tokens_per_s}


def run(cfg: CoTConfig, resume: bool = False) -> dict:
    out = prepare_output(cfg.output_dir, resume)
    base, tokenizer = load_model(cfg.model)
    problems = sample_problems(cfg.skill, cfg.difficulties, cfg.train_examples, "train", cfg.seed, distinct=False)
    test = sample_problems(cfg.skill, cfg.difficulties, cfg.eval_problems, "test", cfg.seed)
    base_eval = evaluate(base, tokenizer, test, fmt="cot")  # one prompt for both formats; the base picks one
    baseline = {**headline(base_eval), **step_report(test, base_eval["completions"])}

    trained = {}
    for i, fmt in enumerate(COMPARED):
        folder = out / fmt
        continue_training = resume and (i == 0 or (folder / "checkpoint").exists())  # later ones may not have started
        trained[fmt] = resumable(folder / "result.json", resume,
                                 partial(train_format, cfg, fmt, problems, test, folder, continue_training))
    cot, direct = trained["cot"], trained["direct"]
    gap = {d: cot["by_difficulty"][d] - direct["by_difficulty"][d] for d in cot["by_difficulty"]}
    metrics = {**{k: v for k, v in cot.items() if k not in ("time_s", "tokens_per_s")},
               "direct": {k: v for k, v in direct.items() if k not in ("time_s", "tokens_per_s")},
               "cot_minus_direct": gap, "train_examples": len(problems)}

    curves = {"CoT-trained": cot["by_difficulty"], "direct-trained": direct["by_difficulty"],
              "base": baseline["by_difficulty"]}
    accuracy_by_difficulty({name: {int(d): a for d, a in c.items()} for name, c in curves.items()},
                           out / "accuracy_by_difficulty.png",
                           f"CoT vs direct fine-tuning ({cfg.skill}, same problems and steps)")
    first_error_histogram({name: {int(d): {int(i): n for i, n in h.items()} for d, h in r["first_error"].items()}
                           for name, r in (("base", baseline), ("CoT-trained", cot))},
                          out / "first_error.png", "Where the reasoning first goes wrong")
    timing = TrainResult([], {}, cot["time_s"] + direct["time_s"], cot["tokens_per_s"])  # both trainings
    return write_summary(out, "cot-ft", cfg, metrics, baseline, base, timing, model_dir=str(out / "cot" / "model"))
