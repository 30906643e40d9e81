"""The reasoning world for a pretrained chat model, and what fine-tuning it costs elsewhere.

When `--model` is a chat model (its tokenizer has a chat template) and no `--data` is given, the methods
train and measure on the world's problems asked as requests (world/chat.py), the answers read by
convention (world/answers.py). Two ways to ask:

    answer   "What is 48 plus 80? Reply with just the number."          RL, best-of-N, self-consistency
    worked   "What is 48 plus 80? Work it out column by column, ..."    SFT and LoRA: worked solutions

What a model loses (`GeneralProbe`): a fixed set of requests outside the task (plain instructions and
questions, and the world's other skills in words) with the *start* model's own greedy replies. Their
negative log-likelihood per token under a model says how far it moved away from what it used to say
there: equal to the start model's before training, higher after it forgot.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from posttrain.data import encode_prompt, has_chat_template, pad_batch
from posttrain.errors import UserError
from posttrain.evaluation import evaluate_answers
from posttrain.generation import generate, labelled_token_logprobs
from posttrain.losses.sft import IGNORE
from posttrain.world import MAIN_SKILL, sample_problems
from posttrain.world.chat import REPLY, WORKED_REPLY, chat_question, chat_requests, worked_solution

# Requests outside the task, none of them arithmetic on two numbers: a model trained only on sums should
# still answer these as it did.
GENERAL_PROMPTS = (
    "Name three colours.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me a word that means happy.",
    "What do bees make?",
    "Say hello in Spanish.",
    "What is the opposite of cold?",
    "List two animals that live in water.",
    "Why do we need sleep? Answer in one sentence.",
    "What colour is the sky on a clear day?",
    "Finish the sentence: The cat sat on the",
    "How many days are in a week?",
    "Is a tomato a fruit or a vegetable?",
    "Suggest a name for a pet dog.",
    "What season comes after winter?",
    "Write a short greeting for a birthday card.",
    "Please reverse the list 3 1 4 1.",
    "Please sort 5 2 8 1 in ascending order.",
    "Is 62 greater than, less than or equal to 55?",
    "Spell the word 'garden' backwards.",
)
GENERAL_MAX_NEW_TOKENS = 48
CHAT_MAX_NEW_TOKENS = 32  # a reply with the bare number: "48 + 80 = 128" is about 12 tokens
CHAT_WORKED_TOKENS = 96  # a worked 2-digit addition is 55-80 tokens, a 3-digit one up to about 95


def uses_chat_world(tokenizer, data: str | None) -> bool:
    """Whether a run with this model's tokenizer and `--data` trains on the chat world."""
    return data is None and has_chat_template(tokenizer)


def training_pairs(difficulties, n: int, seed: int, worked: bool) -> list[tuple[str, str]]:
    """`n` (request, completion) pairs of world addition from the train split: worked solutions if
    `worked`, else the bare answers."""
    problems = sample_problems(MAIN_SKILL, difficulties, n, "train", seed, distinct=False)
    reply = WORKED_REPLY if worked else REPLY
    return [(chat_question(p, reply=reply), worked_solution(p) if worked else p.answer) for p in problems]


def held_out_accuracy(model, tokenizer, difficulties, n: int, seed: int, worked: bool, max_new_tokens: int) -> dict:
    """Greedy accuracy on `n` test-split world additions asked as requests (a worked solution asked for if
    `worked`), with the completions, verdicts and prompts (evaluate_answers' keys)."""
    problems = sample_problems(MAIN_SKILL, difficulties, n, "test", seed)
    prompts, answers = chat_requests(problems, WORKED_REPLY if worked else REPLY)
    return evaluate_answers(model, tokenizer, prompts, answers, max_new_tokens)


@dataclasses.dataclass
class GeneralProbe:
    """The start model's greedy replies to GENERAL_PROMPTS, as token rows to score other models on."""

    rows: list[tuple[list[int], list[int]]]  # (input_ids, labels): the prompt unlabelled, the reply labelled

    @classmethod
    def of(cls, start_model, tokenizer) -> "GeneralProbe":
        if not has_chat_template(tokenizer):
            raise UserError("the general-request probe needs a chat model (a tokenizer with a chat template)")
        samples = generate(start_model, tokenizer, list(GENERAL_PROMPTS), max_new_tokens=GENERAL_MAX_NEW_TOKENS)
        rows = []
        for prompt, reply in zip(GENERAL_PROMPTS, samples.token_ids):
            ids = encode_prompt(tokenizer, prompt)
            rows.append((ids + reply, [IGNORE] * len(ids) + reply))
        return cls(rows)

    @torch.no_grad()
    def nll(self, model, pad_id: int) -> dict:
        """Mean negative log-likelihood per reply token of the start model's replies under `model`."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        batch = {k: v.to(next(model.parameters()).device) for k, v in pad_batch(self.rows, pad_id).items()}
        logp = labelled_token_logprobs(model, batch).logp  # (N,) over every reply token
        model.train(was_training)
        return {"general_nll": float(-logp.mean()), "general_tokens": len(logp),
                "general_seconds": time.perf_counter() - start}


def general_nll(probe: GeneralProbe | None, model, tokenizer) -> dict:
    """`probe.nll` of `model`, or nothing without a probe (a run that is not on the chat world)."""
    return probe.nll(model, tokenizer.pad_token_id) if probe else {}
