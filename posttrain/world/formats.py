"""How a problem is written down, and how a model's answer to it is read back and checked.

Three formats of the same problem share one prompt line and one answer line:

    direct        Q: 347+285            chain of thought   Q: 347+285
                  A: 632                                   Let's think step by step.
                                                           5+7+0... one step per line
                                                           A: 632
    instruction   Q: What is 347 plus 285?
                  A: 632

The answer always sits on a line starting with `A:`, so one extractor reads every format, and the
verifier (the reward function RL and best-of-N use) compares it with the reference answer.
"""
from __future__ import annotations

import re

from posttrain.world.skills import Problem

COT_TRIGGER = "Let's think step by step."
FORMATS = ("direct", "cot", "instruction")

# Natural-language phrasings per skill and style. The styles "formal" and "story" never appear in
# training data (held-out styles), nor does the single combination ("sort", "polite").
TEMPLATES = {
    "add": {
        "question": "What is {a} plus {b}?",
        "imperative": "Add {a} and {b}.",
        "polite": "Please compute the sum of {a} and {b}.",
        "casual": "hey, what do {a} and {b} add up to?",
        "formal": "Determine the sum of {a} and {b}.",
        "story": "I have {a} apples and get {b} more. How many apples do I have?",
    },
    "sub": {
        "question": "What is {a} minus {b}?",
        "imperative": "Subtract {b} from {a}.",
        "polite": "Please compute the difference of {a} and {b}.",
        "casual": "hey, what's {a} take away {b}?",
        "formal": "Determine {a} minus {b}.",
        "story": "I have {a} apples and give away {b}. How many apples are left?",
    },
    "compare": {
        "question": "Is {a} greater than, less than or equal to {b}?",
        "imperative": "Compare {a} with {b}.",
        "polite": "Please compare {a} and {b}.",
        "casual": "hey, how does {a} stack up against {b}?",
        "formal": "Determine the order relation between {a} and {b}.",
        "story": "Ann has {a} coins and Bob has {b}. How do their amounts compare?",
    },
    "reverse": {
        "question": "What is the list {xs} backwards?",
        "imperative": "Reverse the list {xs}.",
        "polite": "Please reverse {xs}.",
        "casual": "hey, flip {xs} around?",
        "formal": "Write the elements of {xs} in reverse order.",
        "story": "Cards {xs} lie in a row. Read them from the other end.",
    },
    "sort": {
        "question": "What is {xs} in ascending order?",
        "imperative": "Sort the list {xs}.",
        "polite": "Please sort {xs}.",
        "casual": "hey, put {xs} in order?",
        "formal": "Arrange the elements of {xs} in ascending order.",
        "story": "Cards {xs} lie in a row. Order them from smallest to largest.",
    },
}
STYLES = ("question", "imperative", "polite", "casual", "formal", "story")
HELD_OUT_STYLES = ("formal", "story")
HELD_OUT_COMBINATION = ("sort", "polite")
SEEN_STYLES = tuple(s for s in STYLES if s not in HELD_OUT_STYLES)

# Held-out wordings: new sentences for each skill, in no training data and no pretraining document,
# made of words instruction tuning's training requests use (all but "them" and "turned"). Where the
# held-out styles bring words only pretraining prose has, these ask whether tuning carries a skill to
# a new sentence of known words. They were written before any run and are not tuned to results.
NEW_WORDINGS = ("new 1", "new 2", "new 3", "new 4")
HELD_OUT_WORDINGS = {
    "add": ("Could you find {a} plus {b}?", "Find the total of {a} and {b}.", "What do {a} and {b} add up to?",
            "Please add {a} and {b}."),
    "sub": ("Could you find {a} minus {b}?", "Please take {b} away from {a}.", "What is the difference of {a} and {b}?",
            "Find {a} take away {b}."),
    "compare": ("Could you compare {a} with {b}?", "Please find how {a} compares to {b}.",
                "Which is larger, {a} or {b}? Compare them.", "Compare {a} and {b}, please."),
    "reverse": ("Could you reverse {xs}?", "Please write {xs} backwards.", "What is {xs} turned around?",
                "Reverse {xs}, please."),
    "sort": ("Could you sort {xs}?", "Please put {xs} in order.", "What is the list {xs} sorted?",
             "Sort {xs} in ascending order."),
}
# Every phrasing by name: the styles', then the held-out wordings'.
PHRASINGS = {skill: {**TEMPLATES[skill], **dict(zip(NEW_WORDINGS, HELD_OUT_WORDINGS[skill]))} for skill in TEMPLATES}


def is_seen_phrasing(skill: str, style: str) -> bool:
    """Whether instruction data for training may use this skill/style pair."""
    return style in SEEN_STYLES and (skill, style) != HELD_OUT_COMBINATION


def question(problem: Problem, fmt: str = "direct", style: str = "question") -> str:
    """The text after `Q: `: symbolic for direct/CoT, a natural-language phrasing (a style or a held-out
    wording, `PHRASINGS`) for instruction."""
    if fmt != "instruction":
        return problem.expression
    return fill(PHRASINGS[problem.skill][style], problem)


def fill(template: str, problem: Problem) -> str:
    """`template` with the problem's operands in its {a} and {b}, or its list in {xs}."""
    if problem.skill in ("reverse", "sort"):
        return template.format(xs=" ".join(map(str, problem.operands[0])))
    return template.format(**dict(zip("ab", map(str, problem.operands))))


def render(problem: Problem, fmt: str = "direct", style: str = "question") -> tuple[str, str]:
    """(prompt, completion) of `problem` in `fmt`; the completion carries no end-of-sequence token."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    prompt = f"Q: {question(problem, fmt, style)}\n"
    answer_line = f"A: {problem.answer}"
    if fmt == "cot":
        return prompt, "\n".join([COT_TRIGGER, *problem.steps, answer_line])
    return prompt, answer_line


_ANSWER_LINE = re.compile(r"^A:[ \t]*(.*?)[ \t]*$", re.MULTILINE)


def extract_answer(completion: str) -> str | None:
    """The text of the first `A:` line, with runs of spaces collapsed; None when there is none."""
    match = _ANSWER_LINE.search(completion)
    return " ".join(match.group(1).split()) if match else None


def verify(prompt: str, completion: str, reference: str) -> float:
    """Outcome reward: 1.0 when the extracted answer equals the reference answer, else 0.0."""
    del prompt  # the answer alone decides; kept for the (prompt, completion, reference) contract
    answer = extract_answer(completion)
    return float(answer is not None and answer == " ".join(str(reference).split()))


def completion_steps(completion: str) -> list[str]:
    """The reasoning steps of a completion: its lines before the answer, minus the CoT trigger."""
    steps = []
    for line in completion.split("\n"):
        line = line.strip()
        if line.startswith("A:"):
            break
        if line and line != COT_TRIGGER:
            steps.append(line)
    return steps


def check_steps(problem: Problem, completion: str) -> list[bool]:
    """Process labels: for each written step, whether it equals the reference step at its position.

    A step after a wrong one is judged against the reference too, so an error that propagates (a
    wrong carry) marks the later steps wrong as well. Steps beyond the reference's are wrong.
    """
    reference = problem.steps
    return [i < len(reference) and step == reference[i] for i, step in enumerate(completion_steps(completion))]


def first_error(labels: list[bool]) -> int | None:
    """Index of the first wrong step, or None when every step is right."""
    return next((i for i, ok in enumerate(labels) if not ok), None)
