"""The verifier of prompts a user brings (`--data prompts.jsonl`, records `{"prompt", "answer"}`).

One extractor reads the answer of a completion and of a reference alike: the first of these that the
text has

    \\boxed{72}                    the last one (MATH; Qwen's and DeepSeek's math prompts)
    #### 72                       GSM8K's solutions (so a GSM8K reference, a worked solution, gives 72)
    A: 72   Answer: 72   the answer is 72        the rest of the last such line
    ... 72                        otherwise, in a completion, the last number anywhere in it

(a reference with none of the markers is its whole text: "Paris", "1 1 3 4"; so is a completion compared
with such a text reference, rather than its last number). The two answers are then
compared: by value when the reference's answer is a number ("72 apples", "$72.00" and "72." all match
72; 3.5 matches 3.50, 1,234 matches 1234, -5 does not match 5), else as text after normalising both
(spaces collapsed, case folded, `$` and a final full stop dropped). A reference copied verbatim as a
completion therefore always matches itself. The reward is 1.0 on a match, else 0.0: RL with verifiable
rewards (Lambert et al. 2024, Tulu 3).
"""
from __future__ import annotations

import re
from decimal import Decimal

BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")  # one level of nested braces: \boxed{\frac{1}{2}}
HASHES = re.compile(r"####\s*(.+)")
ANSWER_LINE = re.compile(r"(?:\bA:|\banswer:|\banswer is)\s*(.+)", re.IGNORECASE)
MARKERS = (BOXED, HASHES, ANSWER_LINE)
# 1,234,567.5 (groups of three after a comma), 1234.5, .5, each possibly negative; "1,2,3" is three numbers.
NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d,]*\d)")
MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # typeset minus and en dash, as models write them


def marked_answer(text: str) -> str | None:
    """The answer a marker (`\\boxed{}`, `####`, `A:` / "the answer is") gives in `text`, or None."""
    for pattern in MARKERS:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


def extract_answer(completion: str) -> str | None:
    """The completion's answer by the conventions above; None when it has none (not even a number)."""
    answer = marked_answer(completion)
    if answer is not None:
        return answer
    numbers = NUMBER.findall(completion.translate(MINUS_SIGNS))
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str:
    """The answer of a reference: what a marker gives (a GSM8K solution's `#### 42`), else the whole text."""
    answer = marked_answer(reference)
    return reference if answer is None or not answer.strip() else answer


def number_key(text: str) -> str:
    """A number's canonical text, equal for equal values: "1,234" and "1234.00" -> "1234", "-0.50" -> "-0.5"."""
    digits = format(Decimal(text.translate(MINUS_SIGNS).replace(",", "")), "f")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return "0" if digits in ("-0", "") else digits


def as_number(text: str) -> str | None:
    """The canonical value (number_key) of the first number in `text`, or None."""
    match = NUMBER.search(text.translate(MINUS_SIGNS))
    return number_key(match.group()) if match else None


def normalise(text: str) -> str:
    return " ".join(text.replace("$", " ").split()).rstrip(".").strip().casefold()


def is_number(answer: str) -> bool:
    return NUMBER.fullmatch(normalise(answer).translate(MINUS_SIGNS)) is not None


def answer_key(answer: str, numeric: bool) -> str | None:
    """What is compared: the value of the answer's first number (`numeric`), else its normalised text."""
    return as_number(answer) if numeric else normalise(answer)


def completion_key(completion: str, reference: str) -> str | None:
    """The completion's answer as it is compared with `reference` (and, in a majority vote, with the
    other samples' answers); None when it gives none."""
    numeric = is_number(reference_answer(reference))
    answer = extract_answer(completion) if numeric else reference_answer(completion)  # text: read as references are
    return None if answer is None else answer_key(answer, numeric)


def reference_key(reference: str) -> str | None:
    """The reference's answer in compared form; itself a reference that compares as the original."""
    answer = reference_answer(reference)
    return answer_key(answer, is_number(answer))


def answer_matches(completion: str, reference: str) -> float:
    """1.0 when the completion's answer equals the reference's (by value if that is a number), else 0.0."""
    key = completion_key(completion, reference)
    return float(key is not None and key == reference_key(reference))


def answer_rewards(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """The RewardFn of user prompts (rollouts.py): each completion's `answer_matches` against its reference."""
    del prompts  # the answer alone decides
    return [answer_matches(c, a) for c, a in zip(completions, answers)]
