"""Chain-of-thought fine-tuning vs direct answers: the step report by hand, a quick run's effect
direction and outputs, and the default run's Done-when bar (slow)."""
import json

import pytest

from posttrain.config import load_config
from posttrain.methods.finetuning import cot
from posttrain.world import Problem

# The reference chain of 47+85 (a 2-digit problem) has three steps.
STEP_1, STEP_2, STEP_3 = "7+5+0=12, digits 2, carry 1", "4+8+1=13, digits 32, carry 1", "0+0+1=1, digits 132, carry 0"


def chain(*steps: str, answer: str = "132") -> str:
    return "\n".join(["Let's think step by step.", *steps, f"A: {answer}"])


def test_step_report_by_hand():
    """Three chains for 47+85 and one for 100+200 (3 digits, reference steps 0+0+0, 0+0+0, 1+2+0):
    all right (3 of 3 steps right), second step wrong (2 of 3: the third matches the reference again),
    stopped after one step (1 of 1 written; the missing second step is its first error), and a
    3-digit chain wrong from its first step.
    Step accuracy at 2 digits = (3 + 2 + 1) / (3 + 3 + 1) = 6/7; at 3 digits 0/1.
    First errors: 2 digits -> step index 1 twice; 3 digits -> index 0 once."""
    p2 = Problem("add", (47, 85), 2)
    p3 = Problem("add", (100, 200), 3)
    assert p2.steps == [STEP_1, STEP_2, STEP_3]
    completions = [chain(STEP_1, STEP_2, STEP_3), chain(STEP_1, "4+8+1=14, digits 42, carry 1", STEP_3, answer="142"),
                   chain(STEP_1, answer="2"), chain("9+9+0=18, digits 8, carry 1", answer="18")]
    report = cot.step_report([p2, p2, p2, p3], completions)
    assert report["step_accuracy_by_difficulty"] == {2: pytest.approx(6 / 7), 3: 0.0}
    assert report["first_error"] == {2: {1: 2}, 3: {0: 1}}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cot")
    overrides = [f"{k}={v}" for k, v in cot.QUICK.items()] + [f"output_dir={out}"]
    return out, cot.run(load_config(cot.CoTConfig, None, overrides))


def test_cot_beats_direct_answers_on_the_same_data(quick_run):
    """On the same problems, the quick run's CoT model answers more of them than its direct-answer twin."""
    _, summary = quick_run
    metrics = summary["metrics"]
    gap = metrics["cot_minus_direct"]
    assert gap["2"] >= 0.5 and gap["3"] >= 0.05
    assert metrics["accuracy"] > metrics["direct"]["accuracy"]
    assert metrics["step_accuracy"] > 0.5 and metrics["direct"]["step_accuracy"] is None
    assert metrics["train_tokens"] > 2 * metrics["direct"]["train_tokens"]  # same problems, longer completions


def test_cot_ft_outputs(quick_run):
    out, summary = quick_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["method"] == "cot-ft" and summary["baseline"]["n"] == summary["metrics"]["n"] == 100
    for difficulty, histogram in summary["metrics"]["first_error"].items():
        assert sum(histogram.values()) <= 50  # at most every test problem of that difficulty
    for fmt in cot.COMPARED:
        losses = [json.loads(line)["loss"] for line in (out / fmt / "metrics.jsonl").read_text().splitlines()]
        assert losses[-1] < losses[0]
        assert (out / fmt / "model" / "config.json").exists()
    for name in ("accuracy_by_difficulty.png", "first_error.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_default_cot_ft_meets_the_bar(tmp_path):
    """At the hardest default difficulty, CoT accuracy >= direct accuracy + 25 points."""
    summary = cot.run(load_config(cot.CoTConfig, None, [f"output_dir={tmp_path}"]))
    hardest = str(max(summary["config"]["difficulties"]))
    metrics = summary["metrics"]
    assert metrics["by_difficulty"][hardest] >= metrics["direct"]["by_difficulty"][hardest] + 0.25
    assert (tmp_path / "accuracy_by_difficulty.png").stat().st_size > 0
