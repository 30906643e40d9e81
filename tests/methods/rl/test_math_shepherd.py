"""Math-Shepherd process labels (Wang et al. 2024): the label maths by hand, the step prefixes the
completions start from, the labels of the quick policy's own solutions against the step checker, and a
quick reward run whose PRM learns from them."""
from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.losses.reward import prm_step_loss
from posttrain.methods.common import policy_path
from posttrain.methods.rl import reward_model
from posttrain.methods.test_time import best_of_n, tree_search
from posttrain.models import load_model
from posttrain.reward_models import encode, load_reward_model
from posttrain.rl.process_labels import hard_labels, label_agreement, mc_labels, soft_labels
from posttrain.world import MAIN_SKILL, completion_steps, render, sample_problems

# Three steps: from the first no completion of 4 reaches the answer, from the second 1 of 4, from the third 4 of 4.
OUTCOMES = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_hard_and_soft_labels_by_hand():
    assert hard_labels(OUTCOMES).tolist() == [0.0, 1.0, 1.0]
    assert soft_labels(OUTCOMES).tolist() == [0.0, 0.25, 1.0]
    assert mc_labels(OUTCOMES, "soft").tolist() == [0.0, 0.25, 1.0]


def test_label_agreement_reads_labels_as_right_above_one_half():
    # 0 vs wrong: agree; 0.25 vs right: disagree; 1 vs right: agree; 0.75 vs wrong: disagree
    assert label_agreement(torch.tensor([0.0, 0.25, 1.0, 0.75]), torch.tensor([False, True, True, False])) == 0.5


def test_soft_step_labels_are_read_as_right_above_one_half_in_the_training_accuracy():
    _, metrics = prm_step_loss(torch.tensor([[2.0, -2.0]]), torch.tensor([[0.25, 0.75]]), torch.ones(1, 2))
    assert metrics["step_accuracy"] == 0.0  # 0.25 is a wrong step, 0.75 a right one: both predictions miss


def test_step_prefixes_end_at_the_newlines_the_prm_reads(tokenizer):
    problem = sample_problems(MAIN_SKILL, [3], 1, "train", 0)[0]
    prompt, completion = render(problem, "cot")
    lines = completion.split("\n")  # trigger, the steps, the answer line
    prefixes = reward_model.step_prefixes(completion)
    assert prefixes == ["\n".join(lines[: i + 2]) + "\n" for i in range(len(problem.steps))]
    assert len(prefixes) == len(completion_steps(completion))
    # the PRM's read-out token for step i is the last token of prefix i
    read_at = encode(tokenizer, prompt, completion).steps[:-1]
    assert read_at == [len(encode(tokenizer, prompt, p, final=False).ids) - 1 for p in prefixes]
    # a truncated last step (no newline yet) is a prefix as it stands
    assert reward_model.step_prefixes("Let's think step by step.\n1+2+0=3")[-1] == "Let's think step by step.\n1+2+0=3"


def solution(completion: str, steps: list[bool], correct: bool) -> reward_model.Solution:
    return reward_model.Solution(0, "Q: 1+2\n", completion, correct, steps, "3")


def test_math_shepherd_labels_and_their_agreement_with_the_checker_by_hand():
    right = solution("s1\ns2\nA: 3", [True, True], True)
    slipped = solution("s1\nx2\nA: 4", [True, False], False)
    outcomes = {("Q: 1+2\n", "s1\n"): torch.tensor([1.0, 0.0, 0.0, 0.0]),
                ("Q: 1+2\n", "s1\ns2\n"): torch.tensor([1.0, 1.0, 1.0, 1.0]),
                ("Q: 1+2\n", "s1\nx2\n"): torch.tensor([0.0, 0.0, 0.0, 0.0])}
    # each step's label, then the answer's verdict
    assert reward_model.math_shepherd_labels([right, slipped], outcomes, "soft") == [[0.25, 1.0, 1.0], [0.25, 0.0, 0.0]]
    assert reward_model.math_shepherd_labels([right, slipped], outcomes, "hard") == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    report = reward_model.mc_label_report([right, slipped], outcomes, "hard")
    assert report["mc_label_agreement"] == 1.0  # hard: every step agrees with the checker
    labels = report["mc_labels"]
    assert labels["soft_agreement"] == 0.5  # the two 0.25s of right steps read as wrong
    assert labels["soft_label_of_right_steps"] == pytest.approx((0.25 + 1.0 + 0.25) / 3)
    assert labels["soft_label_of_wrong_steps"] == 0.0
    assert (labels["steps"], labels["prefixes"], labels["rollouts"]) == (4, 3, 4)


def test_rollouts_complete_each_distinct_prefix_k_times(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    cfg = reward_model.RewardConfig(mc_rollouts=3)
    twice = [solution("s1\ns2\nA: 3", [True, True], True)] * 2 + [solution("s1\nx2\nA: 4", [True, False], False)]
    outcomes = reward_model.rollout_outcomes(model, tokenizer, cfg, twice)
    assert sorted(p for _, p in outcomes) == ["s1\n", "s1\ns2\n", "s1\nx2\n"]  # repeated prefixes sampled once
    assert all(o.shape == (3,) and set(o.tolist()) <= {0.0, 1.0} for o in outcomes.values())


def test_settings_are_checked_and_runs_without_steps_refuse_math_shepherd(tmp_path):
    with pytest.raises(UserError, match="prm_labels must be one of checker, math-shepherd, both"):
        load_config(reward_model.CONFIG, None, ["prm_labels=oracle"])
    with pytest.raises(UserError, match="mc_label"):
        load_config(reward_model.CONFIG, None, ["mc_label=medium"])
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "Q", "chosen": "A: 1", "rejected": "A: 2"}\n')
    cfg = load_config(reward_model.CONFIG, None, [f"data={data}", "prm_labels=math-shepherd", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="prm_labels=math-shepherd: --data trains an ORM only"):
        reward_model.run(cfg)


def test_best_of_n_and_tree_search_read_the_math_shepherd_prm(tmp_path):
    for kind in ("orm", "prm-ms"):
        (tmp_path / kind).mkdir()
    assert best_of_n.reward_model_kinds(tmp_path) == ["orm", "prm-ms"]
    assert load_config(tree_search.CONFIG, None, ["prm=prm-ms"]).prm == "prm-ms"
    with pytest.raises(UserError, match="prm must be prm or prm-ms"):
        load_config(tree_search.CONFIG, None, ["prm=orm"])


@pytest.fixture(scope="module")
def policy_labels():
    """The quick policy's own solutions of training problems and Math-Shepherd outcomes of their steps."""
    cfg = load_config(reward_model.CONFIG, None, [f"{k}={v}" for k, v in reward_model.QUICK.items()])
    policy, tokenizer = load_model(policy_path(cfg.model))
    solutions = reward_model.sample_solutions(policy, tokenizer, cfg, "train", cfg.train_problems, cfg.samples)
    return solutions, reward_model.rollout_outcomes(policy, tokenizer, cfg, solutions)


def test_policy_mc_labels_agree_with_the_checker_and_rank_wrong_steps_lower(policy_labels):
    solutions, outcomes = policy_labels
    report = reward_model.mc_label_report(solutions, outcomes, "hard")
    labels = report["mc_labels"]
    print(json.dumps(report))
    assert report["mc_label_agreement"] > 0.75
    assert labels["soft_label_of_wrong_steps"] < labels["soft_label_of_right_steps"] - 0.2


@pytest.fixture(scope="module")
def quick_math_shepherd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward-ms")
    overrides = [f"{k}={v}" for k, v in reward_model.QUICK.items()] + [f"output_dir={out}", "prm_labels=both"]
    return out, reward_model.run(load_config(reward_model.CONFIG, None, overrides))


def test_quick_math_shepherd_run_writes_its_prm_and_metrics(quick_math_shepherd_run):
    out, summary = quick_math_shepherd_run
    metrics = summary["metrics"]
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("prm", "mc"))}))
    assert 0 <= metrics["mc_label_agreement"] <= 1 and metrics["mc_labels"]["rollouts"] == 4
    assert metrics["prm_ms_step_accuracy"] > 0.5  # judged against the checker on held-out samples
    assert metrics["prm_step_accuracy"] > 0.5  # prm_labels=both: the checker-labelled PRM beside it
    assert load_reward_model(out / "prm-ms").kind == "prm" == load_reward_model(out / "prm").kind
    assert (out / "prm-ms_reliability.png").stat().st_size > 0 and (out / "prm_reliability.png").stat().st_size > 0
    assert set(summary["reward_models"]) == {"orm", "prm", "prm-ms", "proxy"}


def test_best_of_n_and_tree_search_measure_each_prm(quick_math_shepherd_run, tmp_path):
    """Given a reward folder with both PRMs, best-of-N draws a curve per PRM and tree search runs once guided by
    each, the headline PRM's result on top."""
    rm_dir = quick_math_shepherd_run[0]
    common = [f"{k}={v}" for k, v in tree_search.QUICK.items()] + [f"reward_models={rm_dir}"]
    searched = tree_search.run(load_config(tree_search.CONFIG, None, [
        *common, "problems=4", "pool=4", "beam_width=2", "expansions=2", "prm=prm-ms", f"output_dir={tmp_path / 'tree'}"]))
    by_prm = searched["metrics"]["by_prm"]
    assert list(by_prm) == ["prm-ms", "prm"] and searched["metrics"]["accuracy"] == by_prm["prm-ms"]["accuracy"]
    assert searched["metrics"]["best_of_n_equal_budget"]["selector"] == "prm-ms"
    assert all(0 <= r["accuracy"] <= 1 and r["best_of_n_equal_budget"]["n"] >= 1 for r in by_prm.values())
    selected = best_of_n.run(load_config(best_of_n.CONFIG, None, [
        *[f"{k}={v}" for k, v in best_of_n.QUICK.items()], f"reward_models={rm_dir}", "problems=4", "max_n=4", "headline_n=4",
        f"output_dir={tmp_path / 'bon'}"]))
    assert {"orm", "prm", "prm-ms", "majority", "oracle"} <= set(selected["metrics"]["by_n"])
