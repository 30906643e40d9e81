"""Test-time scaling: spend inference compute instead of training. best_of_n.py, self_consistency.py,
cot_prompting.py and tree_search.py; what they share (the held-out questions, sampling N solutions per
question and the greedy baseline of the same model) is here."""
from __future__ import annotations

import dataclasses
import time

from posttrain.data import has_chat_template
from posttrain.evaluation import evaluate, evaluate_answers, max_new_tokens_for
from posttrain.generation import generate
from posttrain.records import PromptRecord
from posttrain.world.answers import completion_key, reference_key
from posttrain.world import MAIN_SKILL, extract_answer, render, sample_problems
from posttrain.world.chat import chat_requests
from posttrain.world.skills import Problem


@dataclasses.dataclass
class Questions:
    """Held-out prompts with their reference answers, and how a completion's answer is read: world
    problems (chain-of-thought prompts, the `A:` line) or a user's `{"prompt", "answer"}` records
    (world/answers.py: `\\boxed{}`, `####`, `A:` ..., numbers compared by value)."""

    prompts: list[str]
    references: list[str]  # each reference answer as answers are compared with it
    max_new_tokens: int
    problems: list[Problem] | None = None  # the world problems, when they are

    @classmethod
    def world(cls, tokenizer, difficulties, n: int, seed: int) -> "Questions":
        problems = sample_problems(MAIN_SKILL, difficulties, n, "test", seed)
        return cls([render(p, "cot")[0] for p in problems], [" ".join(p.answer.split()) for p in problems],
                   max_new_tokens_for(tokenizer, problems), problems)

    @classmethod
    def of_records(cls, records: list, max_new_tokens: int) -> "Questions":
        return cls([r.prompt for r in records], [reference_key(r.answer) for r in records], max_new_tokens)

    def answer(self, i: int, completion: str) -> str | None:
        """Question i's answer in `completion`, comparable with `references[i]` and with other samples' answers."""
        if self.problems is not None:
            return extract_answer(completion)
        return completion_key(completion, self.references[i])

    def is_right(self, i: int, answer: str | None) -> float:
        return float(answer is not None and answer == self.references[i])

    def correct(self, i: int, completion: str) -> float:
        return self.is_right(i, self.answer(i, completion))


def held_out_questions(cfg, records: list | None, tokenizer) -> Questions:
    """A run's questions: `cfg.problems` world problems of `cfg.difficulties` from the test split (asked as
    requests, world/chat.py, when the model is a chat model), or the first `cfg.problems` of the user's
    records; a chat model's replies and the records' answers within `cfg.max_new_tokens`."""
    if records is None and has_chat_template(tokenizer):  # a chat model: world additions asked as requests
        prompts, answers = chat_requests(sample_problems(MAIN_SKILL, cfg.difficulties, cfg.problems, "test", cfg.seed))
        return Questions.of_records([PromptRecord(q, a) for q, a in zip(prompts, answers)], cfg.max_new_tokens)
    if records is None:
        return Questions.world(tokenizer, cfg.difficulties, cfg.problems, cfg.seed)
    return Questions.of_records(records[: cfg.problems], cfg.max_new_tokens)


@dataclasses.dataclass
class SampledSolutions:
    """`k` sampled solutions for each question, grouped per question."""

    prompts: list[str]
    references: list[str]  # Questions.references
    texts: list[list[str]]  # texts[i][j]: sample j of question i
    answers: list[list[str | None]]  # Questions.answer of each sample
    correct: list[list[float]]  # each sample's answer equals the reference
    tokens: list[list[int]]  # generated tokens of each sample
    seconds: float  # wall time of the sampling


def sample_solutions(model, tokenizer, questions: Questions, k: int, temperature: float, seed: int) -> SampledSolutions:
    """`k` samples per question (one shared prefill per prompt), their answers read and checked."""
    start = time.perf_counter()
    samples = generate(model, tokenizer, questions.prompts, max_new_tokens=questions.max_new_tokens,
                       temperature=temperature, num_samples=k, seed=seed)
    seconds = time.perf_counter() - start
    group = lambda xs: [xs[i * k : (i + 1) * k] for i in range(len(questions.prompts))]  # noqa: E731
    texts = group(samples.texts)
    answers = [[questions.answer(i, t) for t in ts] for i, ts in enumerate(texts)]
    correct = [[questions.is_right(i, a) for a in group_answers] for i, group_answers in enumerate(answers)]
    return SampledSolutions(questions.prompts, questions.references, texts, answers, correct,
                            group([len(ids) for ids in samples.token_ids]), seconds)


def greedy_baseline(model, tokenizer, questions: Questions) -> dict:
    """Greedy accuracy of the same model on the same questions (summary's `baseline`); on world problems
    also the step accuracy of its chains of thought."""
    if questions.problems is not None:
        result = evaluate(model, tokenizer, questions.problems, fmt="cot")
        return {"accuracy": result["accuracy"], "n": result["n"], "step_accuracy": result["step_accuracy"],
                "generated_tokens": result["generated_tokens"], "seconds": result["seconds"]}
    # a user's records: their references are already in compared form, which compares as itself
    result = evaluate_answers(model, tokenizer, questions.prompts, questions.references, questions.max_new_tokens)
    return {k: result[k] for k in ("accuracy", "n", "generated_tokens", "seconds")}
