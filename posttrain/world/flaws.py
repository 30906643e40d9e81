"""A sloppy demonstrator: addition solutions with one systematic slip, for post-training to remove.

Real demonstration data is not clean: people and models that write it repeat the same mistakes.
This demonstrator forgets the carry whenever a column totals exactly 10:

    4+6+0=10, digits 0, carry 0        (the reference writes carry 1)

and goes on with the wrong carry, so its final answer is one short in the next column. When a
fraction `slip_rate` > 1/2 of the demonstrations come from it, SFT learns the slip as the likelier
continuation after `=10`, and the greedy policy makes it on every problem with such a column (about a
third of 4-digit additions) while still writing `carry 1` there in about 1 - slip_rate of its samples.
That is the situation preference and RL methods are for: the verifier (and reward models trained on
its labels) see the wrong answers, the step checker flags the slipped step, and the right behaviour
is already in the policy, waiting to be reinforced.
"""
from __future__ import annotations

import random

from posttrain.world.formats import COT_TRIGGER, render
from posttrain.world.skills import Problem, solve_add


def forgetful_carry(total: int) -> int:
    """The sloppy demonstrator's carry: right, except none at all after a column totalling exactly 10."""
    return 0 if total == 10 else total // 10


def slipped_add(a: int, b: int) -> tuple[list[str], str]:
    """Column addition with the slip: a column totalling 10 writes `carry 0` and passes no carry on."""
    return solve_add(a, b, carry_of=forgetful_carry)


def demonstration(problem: Problem, fmt: str, rng: random.Random, slip_rate: float) -> tuple[str, str]:
    """(prompt, completion) as `render` writes it, or, with probability `slip_rate` for chain-of-thought
    addition, as the sloppy demonstrator writes it (the same prompt)."""
    prompt, completion = render(problem, fmt)
    if slip_rate and problem.skill == "add" and fmt == "cot" and rng.random() < slip_rate:
        steps, answer = slipped_add(*problem.operands)
        completion = "\n".join([COT_TRIGGER, *steps, f"A: {answer}"])
    return prompt, completion
