"""The skills of the reasoning world: what a problem is, its answer, and its reasoning steps.

Every skill is a small deterministic algorithm whose intermediate steps can be written one per
line and checked one by one. Multi-digit addition is the main task; the others (subtraction,
comparison, reversing and sorting a list) measure forgetting and instruction following.

A problem's `difficulty` is its number of digits (arithmetic, comparison) or its list length.
"""
from __future__ import annotations

import dataclasses
import random

SKILLS = ("add", "sub", "compare", "reverse", "sort")
MAIN_SKILL = "add"
# A difficulty the embedded base model handles well, per skill: where forgetting is measured.
EASY_DIFFICULTY = {"add": 2, "sub": 2, "compare": 2, "reverse": 4, "sort": 4}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: `skill` applied to `operands` (two ints, or one tuple of digits)."""

    skill: str
    operands: tuple
    difficulty: int

    @property
    def key(self) -> str:
        """A canonical name, used to assign the problem to a split."""
        return f"{self.skill}:{self.operands}"

    @property
    def expression(self) -> str:
        """The symbolic question: `347+285`, `347-285`, `347?285`, `reverse 3 1 4`."""
        if self.skill in ("reverse", "sort"):
            return f"{self.skill} {_digits(self.operands[0])}"
        symbol = {"add": "+", "sub": "-", "compare": "?"}[self.skill]
        a, b = self.operands
        return f"{a}{symbol}{b}"

    @property
    def answer(self) -> str:
        return SOLVERS[self.skill](*self.operands)[1]

    @property
    def steps(self) -> list[str]:
        """The reference chain of thought, one checkable step per line."""
        return SOLVERS[self.skill](*self.operands)[0]


def _digits(xs) -> str:
    return " ".join(str(x) for x in xs)


def _column_digits(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs from the least significant column up; the shorter number is padded with 0."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    return [(int(x), int(y)) for x, y in zip(da, db)]


def solve_add(a: int, b: int, carry_of=lambda total: total // 10) -> tuple[list[str], str]:
    """Column addition: `7+5+0=12, digits 2, carry 1` per column, plus a final carry column.
    `carry_of(column total)` is the carry written and passed on (world/flaws.py passes a wrong one);
    the answer is the digits written, so it is a + b exactly when the carries are right."""
    steps, written, carry = [], "", 0
    for x, y in _column_digits(a, b):
        total = x + y + carry
        written = str(total % 10) + written
        next_carry = carry_of(total)
        steps.append(f"{x}+{y}+{carry}={total}, digits {written}, carry {next_carry}")
        carry = next_carry
    if carry:
        written = "1" + written
        steps.append(f"0+0+1=1, digits {written}, carry 0")
    return steps, str(int(written))


def solve_sub(a: int, b: int) -> tuple[list[str], str]:
    """Column subtraction (a >= b): `14-8-0=6, digits 62, borrow 1` when a column borrows."""
    steps, written, borrow = [], "", 0
    for x, y in _column_digits(a, b):
        if x - y - borrow >= 0:
            value, new_borrow, top = x - y - borrow, 0, x
        else:
            value, new_borrow, top = x + 10 - y - borrow, 1, x + 10
        written = str(value) + written
        steps.append(f"{top}-{y}-{borrow}={value}, digits {written}, borrow {new_borrow}")
        borrow = new_borrow
    return steps, str(a - b)


def solve_compare(a: int, b: int) -> tuple[list[str], str]:
    """Compare from the most significant digit until two digits differ."""
    width = max(len(str(a)), len(str(b)))
    steps = []
    for x, y in zip(str(a).zfill(width), str(b).zfill(width)):
        if x == y:
            steps.append(f"{x} vs {y}: same")
            continue
        steps.append(f"{x} vs {y}: {'greater' if x > y else 'less'}")
        break
    return steps, ">" if a > b else "<" if a < b else "="


def solve_reverse(xs: tuple) -> tuple[list[str], str]:
    """Take elements from the end: `take 4, so far 4 1`."""
    steps, taken = [], []
    for x in reversed(xs):
        taken.append(x)
        steps.append(f"take {x}, so far {_digits(taken)}")
    return steps, _digits(taken)


def solve_sort(xs: tuple) -> tuple[list[str], str]:
    """Selection sort: `smallest 1, so far 1 1`."""
    steps, taken, rest = [], [], list(xs)
    while rest:
        smallest = min(rest)
        rest.remove(smallest)
        taken.append(smallest)
        steps.append(f"smallest {smallest}, so far {_digits(taken)}")
    return steps, _digits(taken)


SOLVERS = {
    "add": solve_add,
    "sub": solve_sub,
    "compare": solve_compare,
    "reverse": lambda xs: solve_reverse(xs),
    "sort": lambda xs: solve_sort(xs),
}


def _number(rng: random.Random, digits: int) -> int:
    """A uniformly random number with exactly `digits` digits (0-9 when digits == 1)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def random_problem(skill: str, difficulty: int, rng: random.Random) -> Problem:
    """Draw one problem of `skill` at `difficulty` (digits, or list length)."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")
    if skill in ("reverse", "sort"):
        operands = (tuple(rng.randint(0, 9) for _ in range(difficulty)),)
    elif skill == "sub":
        a, b = _number(rng, difficulty), _number(rng, difficulty)
        operands = (max(a, b), min(a, b))
    else:
        operands = (_number(rng, difficulty), _number(rng, difficulty))
    return Problem(skill, operands, difficulty)
