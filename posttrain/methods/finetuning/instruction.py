"""Instruction tuning: many skills, many phrasings, and whether the model follows phrasings it never saw.

Multi-task SFT on natural-language requests (FLAN, Wei et al. 2022; here on the world's skills):

    Q: What is 34 plus 58?            Q: Sort the list 3 1 4 1.         Q: hey, flip 2 7 1 around?
    34+58                             sort 3 1 4 1                      reverse 2 7 1
    Let's think step by step.         Let's think step by step.         Let's think step by step.
    4+8+0=12, digits 2, carry 1       smallest 1, so far 1              take 1, so far 1
    ...                               ...                               ...
    A: 92                             A: 1 1 3 4                        A: 1 7 2

Every skill has six phrasings (styles, `world/formats.py`). Training uses only the seen ones, and
the evaluation holds out three kinds of phrasing, each a different question:

    held-out wordings     four new sentences per skill made of words the training requests use
                          ("Could you sort 3 1 4 1?"): does tuning carry a skill to a new sentence?
    held-out styles       "formal" and "story", whose deciding words only pretraining prose has
                          ("I have 9 apples and get 8 more. How many ..."): does it carry new words?
    held-out combination  sort asked politely: a known skill and a known style, never together

Problems are at each skill's easy difficulty, where the base model is good when asked symbolically
(`Q: 34+58`): the run measures following instructions, not learning arithmetic, and reports the
symbolic accuracy before and after as the ceiling and as a forgetting probe. The headline accuracy
is the hardest group, the held-out styles; before and after use the same test problems.

Reordering the loss's floating-point sums alone can move one skill-and-phrasing cell by 0.2: read
single cells with care. New sentences fail where they echo a seen frame of another skill: "Please take {b}
away from {a}." and the seen "Subtract {b} from {a}." both need the second number copied first.

Design choices, each compared with its alternative on held-out styles and seen phrasings:
- The answer first restates the request as the world's symbolic question, then reasons (`restate`).
  Answering directly (`A: 92`) leaves 2-digit addition out of reach of the tiny model; plain chains
  of thought do well on seen phrasings but copy operands by their position in the seen templates,
  which fails on new templates; restating makes skill choice and operand copying one short line,
  which the base's own chain of thought then follows.
- A fifth of the examples are asked symbolically (`symbolic_fraction`): without them the model
  forgets its native format and the held-out combination falls behind; with them "sort" in
  `sort 3 1 4 1` keeps the verb tied to its skill.
- Held-out phrasings need three things: the base model must know their words, so its pretraining
  corpus has prose statements (`world/corpus.py`: "Ann has 34 apples and gets 58 more, so Ann has
  34+58=92.", never a request); the training requests sit among random words (`surround`), so
  operands are copied by what they are rather than where they are; and each skill has more seen
  wordings (`PARAPHRASES`), so no single frame stands for a skill. Each of the three adds to the
  held-out accuracy.

What it cannot do here: reach the bar of 0.8 x seen on the held-out styles (docs/RESULTS.md has the
figures). The formal phrasings mostly work; the misses are requests whose deciding words occur only
in pretraining prose, and the tuned model reads them by the frame, not by those words: "I have 99
apples and get 98 more. How many apples do I have?" becomes `99-98`, "Determine the order relation
between 62 and 55." becomes `62-55` ("between" is in the seen "Find the difference between"), and
"Cards 1 0 3 1 lie in a row. Order them from smallest to largest." becomes `reverse 1 0 3 1` (the
reverse story shares its first sentence). The knowledge is there: the same tuned model restates the
bare statement "I have 99 apples and get 98 more." (`Q: ` and all) as `99+98`; the question sentence
after it is what tips it. Neither changes to the corpus (prose with its symbolic form on the next
line, request frames shared across skills, generic questions among the surrounding words) nor to the
optimisation (learning rate, steps, LoRA on every linear layer, replaying pretraining documents,
freezing the embeddings, four times as many seen wordings per skill) close the gap: which held-out
cells succeed changes from one variant to the next, and held-out and seen accuracy rise and fall
together.

    posttrain instruction --output-dir runs/instruction
"""
from __future__ import annotations

import dataclasses
import itertools
import random

from posttrain.config import check_choices
from posttrain.data import EncodedDataset, encode_pair
from posttrain.errors import UserError
from posttrain.evaluation import evaluate
from posttrain.forward import causal_lm_loss
from posttrain.methods.common import prepare_output, save_model, write_summary
from posttrain.models import DEFAULT_MODEL, load_model
from posttrain.report.finetuning_plots import grouped_bars
from posttrain.report.plots import training_curve
from posttrain.training import TrainingConfig, train
from posttrain.world import (EASY_DIFFICULTY, HELD_OUT_COMBINATION, HELD_OUT_STYLES, NEW_WORDINGS, SKILLS, STYLES,
                             is_seen_phrasing, render, sample_problems)
from posttrain.world.corpus import NAMES, THINGS
from posttrain.world.formats import TEMPLATES, fill

GROUPS = ("seen", "held_out_wordings", "held_out_styles", "held_out_combination")
# What an example's answer looks like. `restate` first writes the request as the world's symbolic
# question (`34+58`, `sort 3 1 4 1`): picking the skill and copying its operands is then one short
# line, after which the base model's own chain of thought for that question takes over.
COMPLETIONS = {
    "restate": lambda p: f"{p.expression}\n{render(p, 'cot')[1]}",
    "cot": lambda p: render(p, "cot")[1],
    "direct": lambda p: render(p, "direct")[1],
}


@dataclasses.dataclass
class InstructionConfig(TrainingConfig):
    model: str = DEFAULT_MODEL  # embedded model name, local folder or hub id
    output_dir: str = "runs/instruction"  # where summary.json, plots and the model go
    skills: list[str] = dataclasses.field(default_factory=lambda: list(SKILLS))  # tasks mixed in the data
    train_examples: int = 8000  # instruction examples, skills and seen phrasings in turn
    completion: str = "restate"  # restate (the symbolic question, then its chain of thought) | cot | direct
    symbolic_fraction: float = 0.2  # share of examples asked symbolically (`Q: 34+58`, the base's format): keeps it
    surround: bool = True  # random words before and after each training request (PREFIXES, SUFFIXES)
    paraphrases: bool = True  # also train on PARAPHRASES, more seen wordings of each skill
    eval_per_cell: int = 50  # test problems per skill, each asked in every phrasing
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20

    def validate(self) -> None:
        super().validate()
        if self.completion not in COMPLETIONS:
            raise UserError(f"completion must be one of {', '.join(COMPLETIONS)}, got '{self.completion}'")
        if not 0 <= self.symbolic_fraction < 1:
            raise UserError(f"symbolic_fraction must be in [0, 1), got {self.symbolic_fraction}")
        check_choices("skills", self.skills, SKILLS)


CONFIG = InstructionConfig
# --quick: a smoke-sized run for tests, on the quick base model, without the surrounding words (they
# lengthen every example and the quick model follows no held-out phrasing either way).
QUICK = {"model": "posttrain:tiny-quick", "train_examples": 2000, "eval_per_cell": 20, "steps": 300, "lr": 3e-3,
         "surround": False}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's SFTConfig learning rate
# (trl/trainer/sft_config.py).
LARGE_MODEL = {"lr": 2e-5}


# Words around a request that change nothing about it ({n} a name, {t} things). Training requests get
# one of each at random, so the numbers sit at varying places among varying words and the model has to
# copy them by what they are, not where they are.
PREFIXES = ("", "", "Quick question. ", "{n} asks: ", "Question from {n}: ", "About the {t}: ", "One more: ",
            "For my homework, ", "Next one. ", "Hi! ", "Here is one for you. ", "Let me ask. ")
SUFFIXES = ("", "", " Thanks!", " Show your steps.", " Be careful.", " I need it soon.", " No rush.",
            " Thanks, {n}.", " It is for the {t}.", " Take your time.")


# More seen wordings per skill, in the registers of the seen styles (never "formal" or "story", and no
# polite one for sort): training only. More templates per task is what made FLAN follow new ones.
PARAPHRASES = {
    "add": ("What is the total of {a} and {b}?", "Find {a} plus {b}.", "Could you add {a} to {b}?",
            "yo, {a} and {b} together?"),
    "sub": ("What is {a} take away {b}?", "Find the difference between {a} and {b}.",
            "Could you take {b} away from {a}?", "yo, {a} minus {b}?"),
    "compare": ("Which is larger, {a} or {b}?", "Find how {a} compares to {b}.", "Could you compare {a} to {b}?",
                "yo, is {a} bigger than {b}?"),
    "reverse": ("What is {xs} read backwards?", "Write {xs} backwards.", "Could you turn {xs} around?",
                "yo, {xs} backwards?"),
    "sort": ("What is {xs} sorted?", "Put the list {xs} in ascending order.", "yo, sort {xs}?"),
}


def surround(request: str, rng: random.Random) -> str:
    """`request` with a random prefix and suffix."""
    words = {"n": rng.choice(NAMES), "t": rng.choice(THINGS)}
    return f"{rng.choice(PREFIXES).format(**words)}{request}{rng.choice(SUFFIXES).format(**words)}"


def training_pairs(cfg: InstructionConfig) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: skills in turn, each cycling through its seen phrasings."""
    per_skill = -(-cfg.train_examples // len(cfg.skills))
    rng = random.Random(cfg.seed)
    pairs = []
    for skill in cfg.skills:
        templates = [TEMPLATES[skill][s] for s in STYLES if is_seen_phrasing(skill, s)]
        templates = itertools.cycle(templates + list(PARAPHRASES[skill] if cfg.paraphrases else ()))
        problems = sample_problems(skill, EASY_DIFFICULTY[skill], per_skill, "train", cfg.seed, distinct=False)
        for i, p in enumerate(problems):
            symbolic = (i + 1) * cfg.symbolic_fraction // 1 > i * cfg.symbolic_fraction // 1  # every 1/F-th example
            if symbolic:
                prompt = render(p, "direct")[0]
            else:
                request = fill(next(templates), p)
                prompt = f"Q: {surround(request, rng) if cfg.surround else request}\n"
            pairs.append((prompt, COMPLETIONS[cfg.completion](p)))
    return pairs


def accuracy_table(model, tokenizer, tests: dict) -> dict[str, dict[str, float]]:
    """skill -> phrasing -> greedy accuracy: the styles, the held-out wordings ("new 1" ...), and "symbolic"
    (`Q: 34+58`, the skill without wording)."""
    problems = [p for skill_problems in tests.values() for p in skill_problems]
    table = {skill: {} for skill in tests}
    for style in (*STYLES, *NEW_WORDINGS, "symbolic"):
        fmt, phrasing = ("direct", "question") if style == "symbolic" else ("instruction", style)
        correct = evaluate(model, tokenizer, problems, fmt=fmt, style=phrasing)["correct"]  # budget: a CoT's length
        start = 0
        for skill, skill_problems in tests.items():
            block = correct[start : start + len(skill_problems)]
            table[skill][style] = sum(block) / len(block)
            start += len(block)
    return table


def group_of(skill: str, style: str) -> str | None:
    if style in NEW_WORDINGS:
        return "held_out_wordings"
    if style in HELD_OUT_STYLES:
        return "held_out_styles"
    if (skill, style) == HELD_OUT_COMBINATION:
        return "held_out_combination"
    return "seen" if style in STYLES else None


def group_accuracy(table: dict) -> dict:
    """Mean accuracy of the cells in each group (cells hold equally many problems), and the symbolic ceiling."""
    cells = {g: [] for g in GROUPS}
    for skill, by_style in table.items():
        for style, accuracy in by_style.items():
            if group_of(skill, style):
                cells[group_of(skill, style)].append(accuracy)
    result = {g: sum(v) / len(v) if v else None for g, v in cells.items()}
    result["symbolic"] = sum(t["symbolic"] for t in table.values()) / len(table)
    return result


def style_accuracy(table: dict) -> dict:
    """Mean accuracy over skills for each phrasing style, the held-out wordings together ("new"), and symbolic."""
    def mean(style: str) -> float:
        return sum(by_style[style] for by_style in table.values()) / len(table)

    new_wordings = sum(map(mean, NEW_WORDINGS)) / len(NEW_WORDINGS)
    return {**{style: mean(style) for style in STYLES}, "new": new_wordings, "symbolic": mean("symbolic")}


def summarise(table: dict, n_per_cell: int) -> dict:
    """The summary's view of an accuracy table: headline (held-out phrasings), groups, and every cell."""
    groups = group_accuracy(table)
    n_held_out = n_per_cell * sum(group_of(k, s) == "held_out_styles" for k in table for s in STYLES)
    return {"accuracy": groups["held_out_styles"], "n": n_held_out, **groups, "by_skill_style": table}


def run(cfg: InstructionConfig, resume: bool = False) -> dict:
    out = prepare_output(cfg.output_dir, resume)
    model, tokenizer = load_model(cfg.model)
    tests = {s: sample_problems(s, EASY_DIFFICULTY[s], cfg.eval_per_cell, "test", cfg.seed) for s in cfg.skills}
    baseline = summarise(accuracy_table(model, tokenizer, tests), cfg.eval_per_cell)

    pairs = training_pairs(cfg)
    rows = [encode_pair(tokenizer, *p) for p in pairs]
    dataset = EncodedDataset(rows, tokenizer.pad_token_id, cfg.batch_size, cfg.seed)
    result = train(model, dataset.batch, causal_lm_loss, cfg, out, resume=resume, desc="instruction")
    after = summarise(accuracy_table(model, tokenizer, tests), cfg.eval_per_cell)
    save_model(model, tokenizer, out / "model")

    training_curve(result.history, out / "training_curve.png", "Instruction tuning on seen phrasings")
    groups = (*GROUPS, "symbolic")
    grouped_bars({"base": {g: baseline[g] for g in groups}, "tuned": {g: after[g] for g in groups}},
                 out / "accuracy_by_group.png", "Instruction following: seen vs held-out phrasings")
    grouped_bars({"base": style_accuracy(baseline["by_skill_style"]), "tuned": style_accuracy(after["by_skill_style"])},
                 out / "accuracy_by_style.png", "Accuracy per phrasing (held out: formal, story and the new wordings)")
    metrics = {**after, "train_examples": len(pairs), "train_tokens": dataset.tokens()}
    return write_summary(out, "instruction", cfg, metrics, baseline, model, result, model_dir=str(out / "model"))
