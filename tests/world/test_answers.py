"""The verifier of user prompts: which answer a completion gives, and when it matches the reference."""
import pytest

from posttrain.world.answers import answer_matches, answer_rewards, extract_answer, reference_key
from posttrain.world import MAIN_SKILL, render, sample_problems, verify


@pytest.mark.parametrize("completion, answer", [
    ("so the total is \\boxed{18}. Or \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last \\boxed{}, nested braces
    ("She pays 3*4=12 dollars.\n#### 12", "12"),  # GSM8K
    ("Let's think step by step.\n4+8+0=12\nA: 92", "92"),  # the world's format
    ("... so the answer is 42 apples.\nDone", "42 apples."),
    ("Answer: yes", "yes"),
    ("first 3, then 5, finally 1,250 in all", "1,250"),  # no marker: the last number
    ("no digits here", None),
])
def test_extract_answer_by_convention(completion, answer):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize("completion, reference, reward", [
    ("#### 72", "72", 1.0),
    ("The answer is $72.00.", "72", 1.0),  # numbers compare by value
    ("A: 1,000", "1000", 1.0),
    ("A: 72 apples", "72", 1.0),
    ("A: 73", "72", 0.0),
    ("A: -5", "5", 0.0),
    ("I get 7, so \\boxed{8}", "7", 0.0),  # the answer in \\boxed{} decides, not an earlier number
    ("A: 1 1 3 4", "1 1 3 4", 1.0),  # text answers compare normalised
    ("Answer: Paris.", "paris", 1.0),
    ("A: 1 1 3", "1 1 3 4", 0.0),
    ("nothing", "4", 0.0),
])
def test_answer_matches(completion, reference, reward):
    assert answer_matches(completion, reference) == reward


def test_answer_rewards_is_a_reward_function():
    assert answer_rewards(["q1", "q2"], ["#### 3", "#### 4"], ["3", "3"]) == [1.0, 0.0]


def test_on_world_solutions_it_agrees_with_the_worlds_verifier():
    for problem in sample_problems(MAIN_SKILL, [1, 2, 3, 4], 50, "test", seed=0):
        prompt, solution = render(problem, "cot")
        wrong = solution.replace(f"A: {problem.answer}", f"A: {int(problem.answer) + 1}")
        for completion in (solution, wrong):
            assert answer_matches(completion, problem.answer) == verify(prompt, completion, problem.answer)
        assert verify(prompt, solution, problem.answer) == 1.0 and verify(prompt, wrong, problem.answer) == 0.0


@pytest.mark.parametrize("reference", ["72", "$1,000.", "-5", "1 1 3 4", "Paris.", "\\frac{1}{2}"])
def test_a_reference_in_compared_form_compares_as_itself(reference):
    """Questions keeps a user's references as `reference_key`s; judging against the key must be judging
    against the reference."""
    for completion in ("A: 72", "#### 1000", "so -5.", "A: 1 1 3 4", "Answer: paris", "\\boxed{\\frac{1}{2}}", "none"):
        assert answer_matches(completion, reference_key(reference)) == answer_matches(completion, reference)


GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("reference", [
    GSM8K_SOLUTION, "#### 1,234", "#### -7", "so \\boxed{3.50}", "The answer is Paris.", "1 1 3 4", "72", "-0.5",
])
def test_a_reference_copied_as_the_completion_scores_one(reference):
    assert answer_matches(reference, reference) == 1.0


@pytest.mark.parametrize("completion, reward", [
    ("The clips: 48 + 24 = 72.\n#### 72", 1.0),
    ("so the answer is 72", 1.0),
    ("\\boxed{72.0}", 1.0),
    ("#### 24", 0.0),  # an intermediate number of the solution is not its answer
    ("48+24=72, minus 48", 0.0),
])
def test_a_gsm8k_solution_as_reference_is_judged_by_its_final_answer(completion, reward):
    assert answer_matches(completion, GSM8K_SOLUTION) == reward


@pytest.mark.parametrize("completion, reference, reward", [
    ("#### 3.50", "3.5", 1.0),
    ("A: 3.5", "#### 3.50", 1.0),
    ("It costs 1,234 dollars", "#### 1234", 1.0),
    ("A: 1234", "1,234", 1.0),
    ("A: -12", "#### -12", 1.0),
    ("A: \u221212", "-12", 1.0),  # a typeset minus sign
    ("A: 12", "#### -12", 0.0),
    ("A: 0.0", "-0", 1.0),
    ("counts 1,2,3", "3", 1.0),  # a list of numbers is not one number with separators
    ("A: 12345678901234567890123456789012", "12345678901234567890123456789013", 0.0),  # no float rounding
])
def test_numbers_compare_by_value(completion, reference, reward):
    assert answer_matches(completion, reference) == reward


def test_a_gsm8k_reference_in_compared_form_is_the_number():
    assert reference_key(GSM8K_SOLUTION) == "72" and reference_key(reference_key(GSM8K_SOLUTION)) == "72"
