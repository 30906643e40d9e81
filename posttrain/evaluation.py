"""Evaluation: accuracy on world problems, and the estimators test-time methods report.

    accuracy      fraction of problems whose greedy answer the verifier accepts
    pass@k        chance that at least one of k samples is right (unbiased, Chen et al. 2021, Eq. 1)
    maj@k         accuracy of the most common answer among k samples (self-consistency)
"""
from __future__ import annotations

import math
from collections import Counter

from posttrain.generation import generate
from posttrain.world import check_steps, extract_answer, render, verify
from posttrain.world.skills import Problem


def max_new_tokens_for(tokenizer, problems: list[Problem], fmt: str = "cot", style: str = "question") -> int:
    """Enough new tokens for the longest reference completion in `fmt`, plus slack for mistakes."""
    longest = max(len(tokenizer(render(p, fmt, style)[1], add_special_tokens=False)["input_ids"]) for p in problems)
    return longest + 8


def evaluate(model, tokenizer, problems: list[Problem], *, fmt: str = "direct", style: str = "question",
             max_new_tokens: int | None = None, batch_size: int = 256) -> dict:
    """Greedy accuracy on `problems` asked in `fmt` (the prompt is the same for direct and CoT).

    Returns accuracy overall and per difficulty, the step accuracy of any reasoning written
    (fraction of steps the step checker accepts), and the completions themselves.
    """
    if not problems:
        return {"accuracy": None, "n": 0}
    prompts = [render(p, fmt, style)[0] for p in problems]
    budget = max_new_tokens or max_new_tokens_for(tokenizer, problems, "cot", style)
    samples = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    correct = [verify(q, c, p.answer) for q, c, p in zip(prompts, samples.texts, problems)]
    labels = [check_steps(p, c) for p, c in zip(problems, samples.texts)]
    steps_written = sum(len(ls) for ls in labels)
    by_difficulty: dict[int, list[float]] = {}
    for p, ok in zip(problems, correct):
        by_difficulty.setdefault(p.difficulty, []).append(ok)
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_difficulty.items())},
        "step_accuracy": sum(map(sum, labels)) / steps_written if steps_written else None,
        "completions": samples.texts,
        "correct": correct,
        "generated_tokens": samples.num_tokens,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: list[str | None]) -> tuple[str | None, float]:
    """(most common answer, its vote share) ignoring missing answers; ties go to the answer seen first."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0.0
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return winner, top / len(answers)


def answers_of(completions: list[str]) -> list[str | None]:
    return [extract_answer(c) for c in completions]
