"""The verifier of prompts a user brings (`--data prompts.jsonl`, records `{"prompt", "answer"}`).

The world's completions end in an `A:` line (world.verify). A model trained elsewhere writes its
answer its own way, so the answer is the first of these that the completion has:

    \\boxed{72}                    the last one (MATH; Qwen's and DeepSeek's math prompts)
    #### 72                       GSM8K's solutions
    A: 72   Answer: 72   the answer is 72        the rest of the last such line
    ... 72                        otherwise the last number anywhere in the completion

and it is compared with the reference after normalising both (spaces collapsed, case folded, `$`
and a final full stop dropped). A reference that is a number is compared by value with the first
number of the extracted answer, so "72 apples", "$72.00" and "72." all match 72, and 1,000 matches
1000. The reward is 1.0 on a match, else 0.0: RL with verifiable rewards (Lambert et al. 2024, Tulu 3).
"""
from __future__ import annotations

import re

BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")  # one level of nested braces: \boxed{\frac{1}{2}}
HASHES = re.compile(r"####\s*(.+)")
ANSWER_LINE = re.compile(r"(?:\bA:|\banswer:|\banswer is)\s*(.+)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(completion: str) -> str | None:
    """The completion's answer by the conventions above; None when it has none (not even a number)."""
    for pattern in (BOXED, HASHES, ANSWER_LINE):
        found = pattern.findall(completion)
        if found:
            return found[-1]
    numbers = NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def as_number(text: str) -> float | None:
    """The value of the first number in `text` (thousands separators allowed), or None."""
    match = NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def normalise(text: str) -> str:
    return " ".join(text.replace("$", " ").split()).rstrip(".").strip().casefold()


def is_number(reference: str) -> bool:
    return NUMBER.fullmatch(normalise(reference)) is not None


def answer_key(answer: str, numeric: bool) -> str | None:
    """What is compared: the value of the answer's first number (`numeric`), else its normalised text."""
    if not numeric:
        return normalise(answer)
    value = as_number(answer)
    return None if value is None else repr(value)


def completion_key(completion: str, reference: str) -> str | None:
    """The completion's answer as it is compared with `reference` (and, in a majority vote, with the
    other samples' answers); None when it gives none."""
    answer = extract_answer(completion)
    return None if answer is None else answer_key(answer, is_number(reference))


def reference_key(reference: str) -> str | None:
    return answer_key(reference, is_number(reference))


def answer_matches(completion: str, reference: str) -> float:
    """1.0 when the completion's answer equals `reference` (by value if `reference` is a number), else 0.0."""
    key = completion_key(completion, reference)
    return float(key is not None and key == reference_key(reference))


def answer_rewards(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """The RewardFn of user prompts (rl.rollouts): each completion's `answer_matches` against its reference."""
    del prompts  # the answer alone decides
    return [answer_matches(c, a) for c, a in zip(completions, answers)]
