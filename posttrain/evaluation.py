"""Evaluation: accuracy on world problems, and the estimators test-time methods report.

    accuracy      fraction of problems whose greedy answer the verifier accepts (a user's prompts with
                  reference answers: `evaluate_answers`, world/answers.py judging)
    held-out NLL  mean negative log-likelihood per completion token of a user's held-out completions,
                  teacher-forced (`completion_nll`)
    pass@k        chance that at least one of k samples is right (unbiased, Chen et al. 2021, Eq. 1)
    maj@k         accuracy of the most common answer among k samples (self-consistency)
    best-of-n     expected correctness of the top-scored of n samples, from k >= n samples
    AUC, ECE      how well scores separate right from wrong, and how calibrated probabilities are
    overoptimisation   where a proxy reward keeps rising while verified accuracy falls (reward hacking)
"""
from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter

import torch

from posttrain.data import encode_pair, pad_batch
from posttrain.forward import causal_lm_loss
from posttrain.generation import generate
from posttrain.world.answers import answer_rewards
from posttrain.world import check_steps, render, verify
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
    start = time.perf_counter()
    prompts = [render(p, fmt, style)[0] for p in problems]
    budget = max_new_tokens or max_new_tokens_for(tokenizer, problems, "cot", style)
    samples = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size,
                       desc=f"greedy answers to {len(prompts)} held-out problems")
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
        "seconds": time.perf_counter() - start,  # wall time of the generation and checking above
    }


def evaluate_answers(model, tokenizer, prompts: list, answers: list[str], max_new_tokens: int) -> dict:
    """Greedy accuracy on a user's prompts, each completion's answer checked against its reference by
    world/answers.py; with the completions, verdicts and prompts."""
    start = time.perf_counter()
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                       desc=f"greedy answers to {len(prompts)} held-out prompts")
    correct = answer_rewards(prompts, samples.texts, answers)
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "completions": samples.texts,
            "correct": correct, "prompts": prompts, "references": answers, "generated_tokens": samples.num_tokens,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def completion_nll(model, tokenizer, pairs: list[tuple], batch_size: int = 32) -> float:
    """Mean negative log-likelihood per completion token of (prompt, completion) pairs, teacher-forced:

        NLL = -1/N sum_i sum_t log pi(y_it | x_i, y_i<t)     N: the completion tokens of all pairs, EOS included

    the SFT loss on held-out data. Unlike exact match of greedy completions it moves with every token the
    model learns, so it says how fine-tuning went on free-text data that no model reproduces character for
    character."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        rows = [encode_pair(tokenizer, *pair) for pair in pairs[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in pad_batch(rows, tokenizer.pad_token_id).items()}
        loss, metrics = causal_lm_loss(model, batch)  # the mean over this batch's metrics["tokens"] tokens
        total += loss.item() * metrics["tokens"]
        tokens += metrics["tokens"]
    model.train(was_training)
    return total / tokens


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


def majority_at_n(answers: list[str | None], reference: str, n: int, trials: int = 200, seed: int = 0) -> float:
    """Expected correctness of the majority answer of n of the k samples (maj@n): the mean over every
    n-subset when there are at most `trials` of them, else over `trials` seeded random n-subsets."""
    k = len(answers)
    if not 1 <= n <= k:
        raise ValueError(f"maj@n needs 1 <= n <= k (n={n}, k={k})")
    if math.comb(k, n) <= trials:
        subsets = list(itertools.combinations(range(k), n))
    else:
        rng = random.Random(seed)
        subsets = [sorted(rng.sample(range(k), n)) for _ in range(trials)]
    # subsets keep sample order, so majority_vote's tie-break (first seen) is the sampling order
    return sum(majority_vote([answers[i] for i in s])[0] == reference for s in subsets) / len(subsets)


def best_of_n(scores: list[float], values: list[float], n: int) -> float:
    """E[value of the top-scored sample among n drawn without replacement from the k given].

    The same idea as the unbiased pass@k: rank the k samples by score (best first, stable); the
    sample of rank i (0-based) is the best of a random n-subset when the other n-1 members all rank
    below it, which happens with probability C(k-1-i, n-1) / C(k, n). Using every subset at once
    gives a smooth curve in n instead of the noise of one random draw of n samples.
    """
    k = len(scores)
    if not 1 <= n <= k:
        raise ValueError(f"best-of-n needs 1 <= n <= k (n={n}, k={k})")
    order = sorted(range(k), key=lambda i: -scores[i])
    total = math.comb(k, n)
    return sum(values[j] * math.comb(k - 1 - rank, n - 1) / total for rank, j in enumerate(order))


def auc(scores: list[float], labels: list[float]) -> float | None:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def calibration(probs: list[float], labels: list[float], bins: int = 10) -> dict:
    """Reliability table (equal-width confidence bins) and expected calibration error.

    ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|   (Guo et al. 2017, Eq. 3)
    """
    table = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [(p, y) for p, y in zip(probs, labels) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if members:
            table.append({"lo": lo, "hi": hi, "n": len(members),
                          "confidence": sum(p for p, _ in members) / len(members),
                          "accuracy": sum(y for _, y in members) / len(members)})
    ece = sum(row["n"] * abs(row["accuracy"] - row["confidence"]) for row in table) / max(1, len(probs))
    return {"ece": ece, "bins": table}


def overoptimisation_point(ns: list[int], proxy: list[float], accuracy: list[float], tolerance: float) -> int | None:
    """The first n where accuracy has fallen more than `tolerance` below its best so far while the
    proxy reward is still above its value at that best: optimising the proxy now hurts. None if never."""
    best = 0
    for i in range(1, len(ns)):
        if accuracy[i] > accuracy[best]:
            best = i
        elif accuracy[best] - accuracy[i] > tolerance and proxy[i] > proxy[best]:
            return ns[i]
    return None
