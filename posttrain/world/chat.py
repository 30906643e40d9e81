"""The world's problems asked in plain words, as a person asks a chat model.

A pretrained chat model (SmolLM2-Instruct, Qwen-Instruct, ...) never saw the embedded model's
`Q: 48+80` notation. For it a problem is one of the requests of world/formats.py (`PHRASINGS`),
followed by one sentence saying how to answer:

    What is 48 plus 80? Reply with just the number.                 skill add, style "question"
    I have 48 apples and get 80 more. How many apples do I have? Reply with just the number.

The model's chat template turns it into a user turn (data.encode_prompt). Its answer is read by the
conventions of any model's output (world/answers.py: `\\boxed{}`, `####`, "the answer is", else the
last number) and compared with the reference by value, so "48 + 80 = 128" and "128." both count.

Asked for a worked solution instead (`WORKED_REPLY`), the reference is the column steps of
world/skills.py in sentences, then "The answer is N." (`worked_solution`): what SFT and LoRA teach.
"""
from __future__ import annotations

from posttrain.world.formats import PHRASINGS, fill
from posttrain.world.skills import Problem

CHAT_SKILLS = ("add", "sub")  # the skills whose answer is one number
REPLY = "Reply with just the number."  # how to answer: the bare answer
WORKED_REPLY = "Work it out column by column, then give the answer."  # how to answer: a worked solution


def chat_question(problem: Problem, style: str = "question", reply: str = REPLY) -> str:
    """The request for `problem` in `style` (a PHRASINGS key), followed by the `reply` instruction."""
    if problem.skill not in CHAT_SKILLS:
        raise ValueError(f"chat questions cover {', '.join(CHAT_SKILLS)}, not {problem.skill!r}")
    return f"{fill(PHRASINGS[problem.skill][style], problem)} {reply}"


def chat_requests(problems: list[Problem], reply: str = REPLY) -> tuple[list[str], list[str]]:
    """(requests, reference answers) of `problems`, each asked in the "question" style with `reply`."""
    return [chat_question(p, reply=reply) for p in problems], [p.answer for p in problems]


def worked_solution(problem: Problem) -> str:
    """The world's column steps (skills.py) as short sentences, ones first, then "The answer is N.":

        48+80, column by column: 8+0+0=8, so far 8, carry 0. 4+8+0=12, so far 28, carry 1.
        0+0+1=1, so far 128, carry 0. The answer is 128.

    Written without spaces inside the sums: a digit after a space is two tokens in most tokenizers.
    """
    a, b = problem.operands
    symbol = "+" if problem.skill == "add" else "-"
    sentences = [f"{a}{symbol}{b}, column by column:"]
    for step in problem.steps:  # "7+5+0=12, digits 632, carry 1" / "14-8-0=6, digits 62, borrow 1"
        sentences.append(step.replace(", digits ", ", so far ") + ".")
    sentences.append(f"The answer is {problem.answer}.")
    return " ".join(sentences)
