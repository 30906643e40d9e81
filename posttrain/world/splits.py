"""Deterministic, disjoint train/validation/test splits of every skill's problem space.

A problem belongs to exactly one split, decided by a stable hash of its canonical key (not by
Python's salted `hash`), so the splits are the same on every machine and never overlap: ~80% of
problems are train, 10% validation, 10% test. Samplers draw from one split with a seeded RNG.
"""
from __future__ import annotations

import hashlib
import random

from posttrain.world.skills import Problem, random_problem

SPLITS = ("train", "val", "test")


def split_of(problem: Problem) -> str:
    bucket = int.from_bytes(hashlib.sha256(problem.key.encode()).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def sample_problem(skill: str, difficulty: int, split: str, rng: random.Random) -> Problem:
    """One problem from `split` (rejection sampling: on average 1.25 draws for train, 10 otherwise)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    while True:
        problem = random_problem(skill, difficulty, rng)
        if split_of(problem) == split:
            return problem


def sample_problems(
    skill: str, difficulties, n: int, split: str, seed: int, distinct: bool = True
) -> list[Problem]:
    """`n` problems of `skill` from `split`, difficulties cycled from `difficulties` (an int or a list).

    `distinct=True` (evaluation sets) never repeats a problem; when a difficulty's split holds
    fewer than its share, the set is smaller than `n` rather than padded with repeats.
    """
    levels = [difficulties] if isinstance(difficulties, int) else list(difficulties)
    rng = random.Random(f"{skill}/{split}/{seed}/{levels}")
    problems, seen = [], set()
    misses = 0
    while len(problems) < n and misses < 2000:
        problem = sample_problem(skill, levels[len(problems) % len(levels)], split, rng)
        if distinct and problem.key in seen:
            misses += 1
            continue
        seen.add(problem.key)
        problems.append(problem)
    return problems
