"""Test-time scaling: spend inference compute instead of training. best_of_n.py, self_consistency.py,
cot_prompting.py and tree_search.py; what they share (sampling N solutions per held-out problem and the
greedy baseline of the same model) is here."""
from __future__ import annotations

import dataclasses
import time

from posttrain.evaluation import answers_of, evaluate, max_new_tokens_for
from posttrain.generation import generate
from posttrain.world import render, verify
from posttrain.world.skills import Problem


@dataclasses.dataclass
class SampledSolutions:
    """`k` sampled chain-of-thought solutions for each problem, grouped per problem."""

    problems: list[Problem]
    prompts: list[str]
    texts: list[list[str]]  # texts[i][j]: sample j of problem i
    correct: list[list[float]]  # verifier outcome of each sample
    tokens: list[list[int]]  # generated tokens of each sample
    seconds: float  # wall time of the sampling

    @property
    def answers(self) -> list[list[str | None]]:
        return [answers_of(group) for group in self.texts]


def sample_solutions(model, tokenizer, problems: list[Problem], k: int, temperature: float, seed: int) -> SampledSolutions:
    """`k` samples per problem (one shared prefill per prompt), labelled by the verifier."""
    prompts = [render(p, "cot")[0] for p in problems]
    start = time.perf_counter()
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens_for(tokenizer, problems),
                       temperature=temperature, num_samples=k, seed=seed)
    seconds = time.perf_counter() - start
    group = lambda xs: [xs[i * k : (i + 1) * k] for i in range(len(problems))]  # noqa: E731
    texts = group(samples.texts)
    correct = [[verify(q, t, p.answer) for t in ts] for q, ts, p in zip(prompts, texts, problems)]
    return SampledSolutions(problems, prompts, texts, correct, group([len(ids) for ids in samples.token_ids]), seconds)


def greedy_baseline(model, tokenizer, problems: list[Problem]) -> dict:
    """Greedy chain-of-thought accuracy of the same model on the same problems (summary's `baseline`)."""
    result = evaluate(model, tokenizer, problems, fmt="cot")
    return {"accuracy": result["accuracy"], "n": result["n"], "step_accuracy": result["step_accuracy"],
            "generated_tokens": result["generated_tokens"], "seconds": result["seconds"]}
