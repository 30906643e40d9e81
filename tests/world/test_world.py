"""The reasoning world: answers, formats, verifiers, step checkers and splits."""
import random
import re

import pytest

from posttrain.world import (
    COT_TRIGGER, SKILLS, Problem, check_steps, extract_answer, first_error, is_seen_phrasing, render,
    sample_problems, split_of, verify,
)
from posttrain.world.corpus import CorpusMix, prose, sample_document
from posttrain.world.formats import TEMPLATES
from posttrain.world.flaws import demonstration, slipped_add
from posttrain.world.skills import random_problem

ADD = Problem("add", (347, 285), 3)


def test_addition_chain_of_thought_is_column_arithmetic():
    prompt, completion = render(ADD, "cot")
    assert prompt == "Q: 347+285\n"
    assert completion == (
        f"{COT_TRIGGER}\n"
        "7+5+0=12, digits 2, carry 1\n"
        "4+8+1=13, digits 32, carry 1\n"
        "3+2+1=6, digits 632, carry 0\n"
        "A: 632"
    )


def test_final_carry_adds_a_step():
    steps = Problem("add", (947, 285), 3).steps
    assert steps[-1] == "0+0+1=1, digits 1232, carry 0" and len(steps) == 4


def test_subtraction_borrows():
    assert Problem("sub", (347, 285), 3).steps == [
        "7-5-0=2, digits 2, borrow 0", "14-8-0=6, digits 62, borrow 1", "3-2-1=0, digits 062, borrow 0"]
    assert Problem("sub", (347, 285), 3).answer == "62"


@pytest.mark.parametrize("skill", SKILLS)
def test_answers_match_python(skill):
    rng = random.Random(1)
    for _ in range(200):
        p = random_problem(skill, rng.randint(1, 5), rng)
        if skill == "add":
            assert p.answer == str(sum(p.operands))
        elif skill == "sub":
            assert p.answer == str(p.operands[0] - p.operands[1])
        elif skill == "compare":
            a, b = p.operands
            assert p.answer == (">" if a > b else "<" if a < b else "=")
        elif skill == "reverse":
            assert p.answer == " ".join(map(str, reversed(p.operands[0])))
        else:
            assert p.answer == " ".join(map(str, sorted(p.operands[0])))
        # the reference chain of thought always ends at the answer
        assert verify(render(p, "cot")[0], render(p, "cot")[1], p.answer) == 1.0


def test_extract_answer_reads_first_answer_line():
    assert extract_answer("A: 632") == "632"
    assert extract_answer("junk\nA:  1  2 3 \nA: 9") == "1 2 3"
    assert extract_answer("no answer here") is None


def test_verifier_on_right_and_wrong_solutions():
    assert verify("Q: 347+285\n", "A: 632", "632") == 1.0
    assert verify("Q: 347+285\n", "A: 631", "632") == 0.0
    assert verify("Q: 347+285\n", "632", "632") == 0.0  # no answer line, no credit
    assert verify("Q: 347+285\n", "A: 0632", "632") == 0.0


def test_step_checker_marks_each_step():
    _, right = render(ADD, "cot")
    assert check_steps(ADD, right) == [True, True, True]
    wrong_carry = right.replace("4+8+1=13, digits 32, carry 1", "4+8+1=13, digits 32, carry 0")
    assert check_steps(ADD, wrong_carry) == [True, False, True]
    assert first_error(check_steps(ADD, wrong_carry)) == 1
    extra = right.replace("\nA:", "\n0+0+0=0, digits 0632, carry 0\nA:")
    assert check_steps(ADD, extra) == [True, True, True, False]
    assert check_steps(ADD, "A: 632") == [] and first_error([]) is None


def test_instruction_phrasings_and_held_out_ones():
    prompt, completion = render(Problem("sort", ((3, 1, 2),), 3), "instruction", "imperative")
    assert prompt == "Q: Sort the list 3 1 2.\n" and completion == "A: 1 2 3"
    assert not is_seen_phrasing("add", "formal") and not is_seen_phrasing("sort", "polite")
    assert is_seen_phrasing("add", "polite")


def test_splits_are_disjoint_and_deterministic():
    sets = {s: {p.key for p in sample_problems("add", 2, 300, s, seed=0)} for s in ("train", "val", "test")}
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["val"] and not sets["val"] & sets["test"]
    assert all(split_of(Problem("add", tuple(map(int, k[5:-1].split(", "))), 2)) == "test" for k in sets["test"])
    again = [p.key for p in sample_problems("add", 2, 300, "test", seed=0)]
    assert set(again) == sets["test"] and len(again) == len(set(again))


def test_small_split_returns_fewer_distinct_problems_rather_than_repeats():
    problems = sample_problems("add", 1, 500, "test", seed=0)
    assert 0 < len(problems) < 30 and len({p.key for p in problems}) == len(problems)


def test_corpus_documents_hold_several_examples_of_one_format():
    rng = random.Random(3)
    documents = [[e for e in sample_document(rng, CorpusMix(), "<eos>").split("<eos>") if e] for _ in range(200)]
    assert all(len(examples) >= 2 for examples in documents)
    requests = [d for d in documents if all(e.startswith("Q: ") and "\nA: " in e for e in d)]
    statements = [d for d in documents if not any("Q: " in e or "\n" in e for e in d)]
    assert len(requests) + len(statements) == len(documents) and 0 < len(statements) < 0.2 * len(documents)


def test_prose_states_the_symbolic_question_and_its_answer():
    rng = random.Random(0)
    for skill, difficulty in (("add", 2), ("sub", 2), ("compare", 2), ("reverse", 4), ("sort", 4)):
        for _ in range(20):
            problem = random_problem(skill, difficulty, rng)
            statement = prose(problem, rng)
            assert problem.expression in statement and problem.answer in statement.split(problem.expression)[1]


def test_the_corpus_never_asks_in_any_phrasing():
    """Pretraining may show a phrasing's words, never a request in a held-out phrasing (nor in any
    phrasing outside the instruction-format documents, which use seen phrasings only)."""
    rng = random.Random(0)
    corpus = "".join(sample_document(rng, CorpusMix(), "<eos>") for _ in range(3000))
    for skill, by_style in TEMPLATES.items():
        for style, template in by_style.items():
            pattern = re.sub(r"\\\{\w+\\\}", r"[\\d ]+", re.escape(template))
            assert bool(re.search(pattern, corpus)) == is_seen_phrasing(skill, style), (skill, style)
    assert "give away" in corpus and "from smallest to largest" in corpus and "order relation" in corpus


def test_sloppy_demonstrator_forgets_the_carry_of_a_column_totalling_ten():
    steps, answer = slipped_add(57, 23)  # reference: 7+3+0=10 carries 1, answer 80
    assert steps == ["7+3+0=10, digits 0, carry 0", "5+2+0=7, digits 70, carry 0"] and answer == "70"
    problem = Problem("add", (57, 23), 2)
    prompt, completion = demonstration(problem, "cot", random.Random(0), slip_rate=1.0)
    assert prompt == render(problem, "cot")[0] and completion.endswith("A: 70")
    assert first_error(check_steps(problem, completion)) == 0 and verify(prompt, completion, problem.answer) == 0.0
    assert slipped_add(*ADD.operands) == (ADD.steps, ADD.answer)  # no column totals 10: nothing to slip on
    assert demonstration(problem, "cot", random.Random(0), slip_rate=0.0) == render(problem, "cot")
    assert demonstration(problem, "direct", random.Random(0), slip_rate=1.0) == render(problem, "direct")
