"""The pretraining corpus of the embedded base model, drawn from the world's training split.

A document is a few worked examples of one skill in one format, separated by the end-of-sequence
token, so the base model learns both the formats and to continue a run of examples (few-shot
prompting). Problems are mostly easy (1-2 digits, short lists) with a thin tail of harder ones:
the base model knows the formats but is weak at the main task's harder difficulties, which is the
room post-training methods have to show what they do.

A small share of documents is prose: statements about amounts and lists in everyday words, each
with its symbolic form (`Ann has 34 apples and gets 58 more, so she has 34+58=92.`). They are the
world's general language, what a real model's pretraining gives it: words such as "give away",
"determine" or "from smallest to largest" and which operation they mean. Prose states, it never
asks, so no request of any phrasing style (seen or held out, `formats.TEMPLATES`) is in the corpus;
instruction tuning then has to teach following requests, including ones worded in ways it never saw.
"""
from __future__ import annotations

import dataclasses
import random

from posttrain.world.formats import SEEN_STYLES, is_seen_phrasing, render
from posttrain.world.skills import SKILLS, Problem
from posttrain.world.splits import sample_problem


@dataclasses.dataclass(frozen=True)
class CorpusMix:
    """How often each skill, format and difficulty appears in pretraining documents."""

    skill_weights: tuple = (("add", 0.4), ("sub", 0.15), ("compare", 0.15), ("reverse", 0.15), ("sort", 0.15))
    format_weights: tuple = (("direct", 0.42), ("cot", 0.42), ("instruction", 0.08), ("prose", 0.08))
    digit_weights: tuple = ((1, 0.3), (2, 0.6), (3, 0.1))  # arithmetic and comparison
    list_lengths: tuple = (2, 3, 4, 5)  # reverse and sort, uniform
    examples_per_document: tuple = (2, 6)  # inclusive range


# Who the statements are about, with their verb forms: (subject, have, get, give).
SUBJECTS = (("Ann", "has", "gets", "gives"), ("Bob", "has", "gets", "gives"), ("I", "have", "get", "give"),
            ("you", "have", "get", "give"), ("we", "have", "get", "give"))
NAMES = ("Ann", "Bob", "Cara", "Dan", "Eve")
THINGS = ("apples", "coins", "cards", "books", "shells")
# Statements per skill: {s} a subject with its verbs {have}/{get}/{give}, {n}/{m} names, {t} things,
# {a}/{b} numbers or {xs} a list, {e} the symbolic question (`34+58`, `reverse 3 1 4`), {y} its answer.
# Every skill has a "determine" sentence, so that word says nothing about which skill is meant.
PROSE = {
    "add": (
        "{S} {have} {a} {t} and {get} {b} more, so {s} {have} {e}={y} {t}.",
        "{n} found {a} {t} and then {b} more: {e}={y}.",
        "To determine the sum of {a} and {b}, add column by column: {e}={y}.",
        "{a} {t} and {b} more {t} make {e}={y} {t} in all.",
    ),
    "sub": (
        "{S} {have} {a} {t} and {give} away {b}, so {e}={y} {t} are left.",
        "{n} had {a} {t} and lost {b}: {e}={y} left.",
        "To determine what is left of {a} after taking away {b}, subtract: {e}={y}.",
        "{a} {t}, {b} of them given away, leave {e}={y} {t}.",
    ),
    "compare": (
        "{n} has {a} {t} and {m} has {b}; their amounts compare as {e}, that is {a}{y}{b}.",
        "To determine the order relation between {a} and {b}, compare them: {e} gives {a}{y}{b}.",
        "Comparing {a} {t} with {b} {t}: {e} gives {a}{y}{b}.",
    ),
    "reverse": (
        "The {t} {xs} lie in a row; read from the other end they are {e} = {y}.",
        "To determine the elements of {xs} in reverse order, take them from the end: {e} = {y}.",
        "{n} read the row {xs} from the other end: {e} = {y}.",
    ),
    "sort": (
        "The {t} {xs} lie in a row; ordered from smallest to largest they are {e} = {y}.",
        "To determine the elements of {xs} in ascending order, take the smallest first: {e} = {y}.",
        "{n} put the row {xs} in order, smallest first: {e} = {y}.",
    ),
}


def prose(problem: Problem, rng: random.Random) -> str:
    """A statement of `problem` in everyday words with its symbolic form and answer."""
    n, m = rng.sample(NAMES, 2)
    subject, have, get, give = rng.choice(SUBJECTS)
    fields = {"n": n, "m": m, "s": subject, "S": subject[0].upper() + subject[1:], "have": have, "get": get,
              "give": give, "t": rng.choice(THINGS), "e": problem.expression, "y": problem.answer}
    if problem.skill in ("reverse", "sort"):
        fields["xs"] = " ".join(map(str, problem.operands[0]))
    else:
        fields["a"], fields["b"] = problem.operands
    return rng.choice(PROSE[problem.skill]).format(**fields)


def _choose(rng: random.Random, weighted: tuple):
    values, weights = zip(*weighted)
    return rng.choices(values, weights=weights)[0]


def sample_document(rng: random.Random, mix: CorpusMix, eos: str) -> str:
    """One document: examples of one skill and one format, each ended by `eos`."""
    skill = _choose(rng, mix.skill_weights)
    fmt = _choose(rng, mix.format_weights)
    examples = []
    for _ in range(rng.randint(*mix.examples_per_document)):
        difficulty = (
            rng.choice(mix.list_lengths) if skill in ("reverse", "sort") else _choose(rng, mix.digit_weights)
        )
        problem = sample_problem(skill, difficulty, "train", rng)
        if fmt == "prose":
            examples.append(prose(problem, rng) + eos)
            continue
        style = rng.choice([s for s in SEEN_STYLES if is_seen_phrasing(skill, s)])
        prompt, completion = render(problem, fmt, style)
        examples.append(prompt + completion + eos)
    return "".join(examples)


assert set(dict(CorpusMix.skill_weights)) == set(SKILLS)
