"""Test-time scaling: the estimators against hand values, selectors under the oracle on fixed samples,
beam-search bookkeeping with a scripted scorer, prompt construction, and quick end-to-end runs."""
import json
import random

import pytest

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.evaluation import best_of_n, majority_at_n, majority_vote, max_new_tokens_for, pass_at_k
from posttrain.generation import generate
from posttrain.methods.common import policy_path
from posttrain.methods.test_time import SampledSolutions, best_of_n as bon, cot_prompting, self_consistency, tree_search
from posttrain.models import load_model
from posttrain.reward_models import new_reward_model
from posttrain.world import MAIN_SKILL, extract_answer, render, sample_problems
from tests.conftest import random_model


def test_pass_at_k_matches_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction right
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than k: some sample is always right


def test_majority_vote_ties_go_to_the_first_seen_answer():
    assert majority_vote(["5", "7", "7", "5"]) == ("5", 0.5)
    assert majority_vote([None, "7", "5", None, "5"]) == ("5", 0.4)  # missing answers vote for nothing
    assert majority_vote([None, None]) == (None, 0.0)


def test_majority_at_n_enumerates_small_subset_counts():
    """answers 1, 2, 2 (reference 2), n = 2: {1,2} tie -> 1 (first seen), {1,2'} -> 1, {2,2'} -> 2: 1/3."""
    assert majority_at_n(["1", "2", "2"], "2", 2) == pytest.approx(1 / 3)
    assert majority_at_n(["1", "2", "2"], "2", 3) == 1.0
    assert majority_at_n(["2", "1", "1"], "2", 1) == pytest.approx(1 / 3)


def test_answer_extraction():
    assert extract_answer("Let's think step by step.\n1+2+0=3, digits 3, carry 0\nA: 3") == "3"
    assert extract_answer(" 1877") is None  # a direct answer needs its "A:" (the prompt's) put back
    assert extract_answer("A:  1  2 \nA: 9") == "1 2"  # the first answer line, spaces collapsed


def fixed_samples(seed: int = 0, problems: int = 12, k: int = 8) -> tuple[SampledSolutions, list, list]:
    """Random but fixed samples: each problem's answers, their correctness, and two random scorers."""
    rng = random.Random(seed)
    probs = sample_problems("add", 2, problems, "test", seed)
    answers = [[p.answer if rng.random() < 0.3 else str(rng.randint(0, 3)) for _ in range(k)] for p in probs]
    texts = [[f"A: {a}" for a in group] for group in answers]
    correct = [[float(a == p.answer) for a in group] for group, p in zip(answers, probs)]
    samples = SampledSolutions(["Q"] * problems, [p.answer for p in probs], texts, answers, correct,
                               [[1] * k] * problems, 1.0)
    scores = lambda: [[rng.random() for _ in range(k)] for _ in range(problems)]  # noqa: E731
    return samples, scores(), scores()


def test_the_oracle_bounds_every_selector_on_fixed_samples():
    samples, orm, prm = fixed_samples()
    ns = [1, 2, 4, 8]
    curves = bon.selector_curves(samples, {"orm": orm, "prm": prm}, ns, subsets=50, seed=0)
    for name in ("orm", "prm", "majority"):
        for n, value, ceiling in zip(ns, curves[name], curves["oracle"]):
            assert value <= ceiling + 1e-9, (name, n)
    # at N = 1 every selector is one random sample: the mean accuracy of the samples
    mean = sum(map(sum, samples.correct)) / (len(samples.correct) * 8)
    assert all(curves[name][0] == pytest.approx(mean) for name in ("orm", "prm", "oracle"))
    # a perfect scorer reaches the oracle
    perfect = bon.selector_curves(samples, {"orm": samples.correct}, ns, subsets=50, seed=0)
    assert perfect["orm"] == pytest.approx(perfect["oracle"]) and "prm" not in perfect
    assert "PRM beats ORM" in bon.ordering(curves, ns)["summary"]
    last = {name: round(perfect[name][-1], 3) for name in ("orm", "majority", "oracle")}
    want = f"At N=8: ORM {last['orm']}, majority {last['majority']}, oracle {last['oracle']}."
    assert bon.ordering(perfect, ns) == {"summary": want}  # no PRM, so no PRM-against-ORM comparison


def test_best_of_n_of_a_perfect_scorer_is_pass_at_n():
    right = [0.0, 1.0, 0.0, 1.0, 0.0]
    for n in range(1, 6):
        assert best_of_n(right, right, n) == pytest.approx(pass_at_k(5, 2, n))


def test_beam_search_bookkeeping_with_a_scripted_scorer():
    """Every partial grows by 'a'/'b' lines; 'b' after 'a' ends the solution. Scores are scripted per text:
    the search must keep the 2 best distinct texts per step and return the best finished one."""
    scripted = {"a\n": 0.9, "b\n": 0.5, "a\na\n": 0.2, "a\nb": 0.8, "b\na\n": 0.7, "b\nb": 0.1,
                "b\na\na\n": 0.3, "b\na\nb": 0.6, "a\na\na\n": 0.05, "a\na\nb": 0.04}
    calls = []

    def expand(prompts, partials):
        calls.append(list(partials))
        return [(["a\n", "b\n" if not p else "b"], [False, bool(p)], 3) for p in partials]

    def score(prompts, texts, finished):
        return [scripted[t] for t in texts]

    best, tokens = tree_search.search(["Q"], expand, score, width=2, max_depth=5)
    assert calls == [[""], ["a\n", "b\n"], ["b\na\n"]]  # finished beams are not expanded again
    assert best[0] == tree_search.Beam("a\nb", 0.8, True)
    assert tokens == [3 * 4]  # four expansions of 3 tokens each
    beams = tree_search.next_beams([tree_search.Beam("x", 0.5, False), tree_search.Beam("x", 0.9, False),
                                    tree_search.Beam("y", 0.5, True), tree_search.Beam("z", 0.7, False)], 2)
    assert beams == [tree_search.Beam("z", 0.7, False), tree_search.Beam("x", 0.5, False)]  # first of equal texts wins


def test_generation_stops_at_stop_ids(tokenizer):
    model = random_model(tokenizer)
    free = generate(model, tokenizer, ["Q: 12+34\n"], max_new_tokens=12)
    stop = free.token_ids[0][2]  # the third greedy token
    cut = generate(model, tokenizer, ["Q: 12+34\n"], max_new_tokens=12, stop_ids=(stop,))
    first = free.token_ids[0].index(stop)
    assert cut.token_ids[0] == free.token_ids[0][: first + 1] and cut.stopped == [True]


def test_few_shot_prompts_chain_exemplars_with_eos():
    problem = sample_problems("add", 3, 1, "test", 0)[0]
    exemplars = sample_problems("add", 3, 2, "train", 0)
    prompts = cot_prompting.style_prompts(problem, exemplars, "<eos>")
    question = f"Q: {problem.expression}\n"
    assert prompts["zero-shot direct"] == (question + "A:", "A:")
    few_cot, prefix = prompts["few-shot CoT"]
    assert few_cot.count("<eos>") == 2 and few_cot.endswith("<eos>" + question) and prefix == ""
    assert prompts["few-shot direct"][0].endswith("<eos>" + question + "A:")
    assert "Let's think step by step." not in prompts["few-shot direct"][0]


def test_confidence_halves():
    halves = self_consistency.confidence_halves([1.0, 0.25, 0.5, 0.75], [True, False, False, True])
    assert halves["confident_accuracy"] == 1.0 and halves["unconfident_accuracy"] == 0.0
    assert halves["confident_mean_share"] == pytest.approx(0.875)


def quick(module, tmp_path, *extra):
    overrides = [f"{k}={v}" for k, v in module.QUICK.items()] + [f"output_dir={tmp_path}", *extra]
    return module.run(load_config(module.CONFIG, None, overrides))


def test_quick_self_consistency(tmp_path):
    summary = quick(self_consistency, tmp_path)
    metrics = summary["metrics"]
    assert metrics["by_k"]["k"] == [1, 2, 4, 8] and metrics["accuracy"] == metrics["by_k"]["majority"][-1]
    assert 0 <= metrics["unconfident_accuracy"] <= 1 and summary["baseline"]["n"] == 40
    assert (tmp_path / "accuracy_vs_k.png").stat().st_size > 0


def test_quick_cot_prompt(tmp_path):
    summary = quick(cot_prompting, tmp_path, "problems=12", "samples=2")
    models = summary["metrics"]["models"]
    assert set(models) == {"base", "fine-tuned"}
    assert set(models["base"]["by_style"]) == set(cot_prompting.STYLES)
    assert summary["baseline"]["accuracy"] == models["base"]["by_style"]["few-shot direct"]["accuracy"]


def test_a_users_records_give_the_world_runs_numbers(tmp_path):
    """The world's test problems written as `{"prompt", "answer"}` records (answers read by world/answers.py
    instead of the world's `A:` line), with the world's completion budget: the same samples, judged the
    same, so self-consistency and best-of-N (an untrained ORM its only reward model) measure the same
    accuracies. Majority votes may differ: a sample without an `A:` line votes with its last number here."""
    policy = policy_path("sft-policy-quick")
    problems = sample_problems(MAIN_SKILL, [2], 12, "test", 0)
    budget = max_new_tokens_for(load_model(policy)[1], problems)
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": render(p, "cot")[0], "answer": int(p.answer)}) + "\n" for p in problems))
    new_reward_model(policy, "orm").save(tmp_path / "rms" / "orm")
    common = ["model=sft-policy-quick", "difficulties=2", "problems=12", "seed=0"]
    runs = {}
    for module, extra in ((self_consistency, ["k=4"]), (bon, ["max_n=8", "headline_n=4", f"reward_models={tmp_path / 'rms'}"])):
        runs[module] = [quick_run(module, tmp_path / name, *common, *extra, *more)
                        for name, more in (("world", []), ("users", [f"data={data}", f"max_new_tokens={budget}"]))]
        world, users = runs[module]
        assert users["baseline"]["accuracy"] == world["baseline"]["accuracy"] > 0
        assert users["metrics"]["sample_accuracy"] == world["metrics"]["sample_accuracy"] > 0
    world, users = (run["metrics"]["by_n"] for run in runs[bon])
    assert set(users) == {"n", "orm", "majority", "oracle"}
    assert users["orm"] == world["orm"] and users["oracle"] == world["oracle"]


def quick_run(module, out, *overrides):
    return module.run(load_config(module.CONFIG, None, [*overrides, f"output_dir={out}"]))


@pytest.mark.slow
def test_quick_best_of_n_and_tree_search(tmp_path):
    """Needs the quick reward stage (cached after its first run)."""
    summary = quick(bon, tmp_path / "bon")
    by_n = summary["metrics"]["by_n"]
    assert by_n["n"] == [1, 2, 4, 8, 16]
    assert all(by_n["oracle"][i] >= max(by_n[s][i] for s in ("orm", "prm", "majority")) - 1e-9 for i in range(5))
    assert "prm-ms" in by_n  # the shared reward stage trains both PRMs
    summary = quick(tree_search, tmp_path / "tree")
    assert summary["metrics"]["best_of_n_equal_budget"]["n"] >= 1
    assert set(summary["metrics"]["by_prm"]) == {"prm", "prm-ms"}


def default_run(module, tmp_path) -> dict:
    return module.run(load_config(module.CONFIG, None, [f"output_dir={tmp_path}"]))


@pytest.mark.slow
def test_default_best_of_n_gains_fifteen_points_under_the_oracle(tmp_path):
    """Best-of-16 with the better reward model >= greedy + 15 points,
    and the oracle (pass@N) bounds every selector."""
    summary = default_run(bon, tmp_path)
    by_n = summary["metrics"]["by_n"]
    assert summary["metrics"]["accuracy"] >= summary["baseline"]["accuracy"] + 0.15
    assert all(by_n["oracle"][i] >= max(by_n[s][i] for s in ("orm", "prm", "majority")) - 1e-9
               for i in range(len(by_n["n"])))
    assert by_n["oracle"][-1] >= by_n["oracle"][0] + 0.2  # more samples do contain more right answers


@pytest.mark.slow
def test_default_self_consistency_beats_greedy(tmp_path):
    summary = default_run(self_consistency, tmp_path)
    assert summary["metrics"]["accuracy"] > summary["baseline"]["accuracy"]


@pytest.mark.slow
def test_default_few_shot_cot_beats_few_shot_direct_on_the_base_model(tmp_path):
    """At least 10 points. Accuracies are multiples of 1/200, so exactly 10 points (21 vs 1 right, say)
    must pass: 0.105 < 0.005 + 0.1 in floating point, hence the 1e-9."""
    summary = default_run(cot_prompting, tmp_path)
    assert summary["metrics"]["accuracy"] >= summary["baseline"]["accuracy"] + 0.10 - 1e-9


@pytest.mark.slow
def test_default_tree_search_reports_its_budget_and_the_equal_budget_baseline(tmp_path):
    metrics = default_run(tree_search, tmp_path)["metrics"]
    assert metrics["generated_tokens_per_problem"] > 0 and metrics["best_of_n_equal_budget"]["n"] >= 1


def test_self_consistency_on_one_record_is_a_clear_error(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "Q: 1+1", "answer": 2}\n')
    with pytest.raises(UserError, match="at least 2 records"):
        quick_run(self_consistency, tmp_path / "run", f"data={data}")
    assert not (tmp_path / "run").exists()


def test_best_of_n_without_reward_models_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no orm/ or prm/ folder"):
        quick_run(bon, tmp_path / "run", "model=sft-policy-quick", f"reward_models={tmp_path / 'empty'}")
