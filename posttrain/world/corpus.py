"""The pretraining corpus of the embedded base model, drawn from the world's training split.

A document is a few worked examples of one skill in one format, separated by the end-of-sequence
token, so the base model learns both the formats and to continue a run of examples (few-shot
prompting). Problems are mostly easy (1-2 digits, short lists) with a thin tail of harder ones:
the base model knows the formats but is weak at the main task's harder difficulties, which is the
room post-training methods have to show what they do.
"""
from __future__ import annotations

import dataclasses
import random

from posttrain.world.formats import SEEN_STYLES, is_seen_phrasing, render
from posttrain.world.skills import SKILLS
from posttrain.world.splits import sample_problem


@dataclasses.dataclass(frozen=True)
class CorpusMix:
    """How often each skill, format and difficulty appears in pretraining documents."""

    skill_weights: tuple = (("add", 0.4), ("sub", 0.15), ("compare", 0.15), ("reverse", 0.15), ("sort", 0.15))
    format_weights: tuple = (("direct", 0.45), ("cot", 0.45), ("instruction", 0.10))
    digit_weights: tuple = ((1, 0.3), (2, 0.6), (3, 0.1))  # arithmetic and comparison
    list_lengths: tuple = (2, 3, 4, 5)  # reverse and sort, uniform
    examples_per_document: tuple = (2, 6)  # inclusive range


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
        style = rng.choice([s for s in SEEN_STYLES if is_seen_phrasing(skill, s)])
        prompt, completion = render(problem, fmt, style)
        examples.append(prompt + completion + eos)
    return "".join(examples)


assert set(dict(CorpusMix.skill_weights)) == set(SKILLS)
