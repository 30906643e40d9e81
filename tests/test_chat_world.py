"""The world asked as a chat model is asked (world/chat.py, chat_world.py), and the methods that train and
measure on it when `--model` is a chat model and no `--data` is given. The chat model here is a tiny random
Llama whose tokenizer has a chat template (conftest.tiny_chat_model_dir): the tests check the path, not
what a real model learns."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.chat_world import GENERAL_PROMPTS, GeneralProbe, training_pairs
from posttrain.cli import main
from posttrain.demo import selected_methods
from posttrain.stages import stage_overrides
from posttrain.methods import METHODS
from posttrain.world.answers import answer_matches
from posttrain.world import sample_problems
from posttrain.world.chat import REPLY, WORKED_REPLY, chat_question, worked_solution

SMOLLM2 = "posttrain:smollm2-135m"


@pytest.mark.parametrize("skill", ["add", "sub"])
@pytest.mark.parametrize("digits", [1, 2, 3])
def test_a_worked_solution_and_the_bare_answer_are_read_as_the_reference(skill, digits):
    for problem in sample_problems(skill, digits, 40, "train", seed=digits):
        assert answer_matches(worked_solution(problem), problem.answer) == 1.0
        assert answer_matches(problem.answer, problem.answer) == 1.0
        wrong = str(int(problem.answer) + 1)
        assert answer_matches(worked_solution(problem).replace(f"is {problem.answer}.", f"is {wrong}."),
                              problem.answer) == 0.0


def test_a_request_names_the_operands_and_how_to_reply():
    problem = sample_problems("add", 2, 1, "test", seed=0)[0]
    a, b = problem.operands
    assert chat_question(problem) == f"What is {a} plus {b}? {REPLY}"
    assert chat_question(problem, "story", WORKED_REPLY).startswith(f"I have {a} apples and get {b} more.")
    with pytest.raises(ValueError, match="compare"):
        chat_question(sample_problems("compare", 2, 1, "test", seed=0)[0])


def test_worked_training_pairs_come_from_the_train_split():
    pairs = training_pairs([2], 50, seed=0, worked=True)
    assert len(pairs) == 50 and all(q.endswith(WORKED_REPLY) and c.startswith(q.split()[2]) for q, c in pairs)
    test_requests = {chat_question(p, reply=WORKED_REPLY) for p in sample_problems("add", 2, 300, "test", seed=0)}
    assert not test_requests & {q for q, _ in pairs}


def test_the_general_probe_scores_the_start_models_replies_as_a_plain_forward_does(tiny_chat_model_dir):
    """NLL per reply token, checked against log_softmax over an unpacked, one-row-at-a-time forward."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    probe = GeneralProbe.of(model, tokenizer)
    assert len(probe.rows) == len(GENERAL_PROMPTS)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in probe.rows:
            logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            for t, label in enumerate(labels[1:]):
                if label != -100:
                    total -= float(logp[t, label])
                    count += 1
    measured = probe.nll(model, tokenizer.pad_token_id)
    assert measured["general_tokens"] == count
    assert measured["general_nll"] == pytest.approx(total / count, rel=1e-4)
    other = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert probe.nll(other, tokenizer.pad_token_id)["general_nll"] > measured["general_nll"]  # greedy = argmax


def test_grpo_on_a_chat_model_trains_on_requests_scored_by_the_answer_they_give(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "grpo"
    code = main(["grpo", "--model", str(tiny_chat_model_dir), "--output-dir", str(out), "difficulties=1", "steps=2",
                 "prompts_per_step=2", "num_generations=2", "batch_size=4", "eval_problems=6", "kl_problems=2",
                 "eval_every=0", "beta=0", "max_new_tokens=6"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].startswith("What is ") and s["prompt"].endswith(REPLY) for s in samples)
    for s in samples:  # "What is A plus B? ...": each verdict is the reply's answer against A + B
        a, b = int(s["prompt"].split()[2]), int(s["prompt"].split()[4].rstrip("?"))
        assert s["correct"] == bool(answer_matches(s["completion"], str(a + b)))
    assert summary["baseline"]["n"] == 6 and summary["metrics"]["kl"] >= 0


def test_an_orm_on_a_chat_models_own_replies_selects_for_best_of_n(tiny_chat_model_dir, tmp_path):
    """`reward` on a chat model labels its replies to world requests by their answer and trains an ORM alone
    (no steps to label); best-of-N then selects with it on the same kind of request."""
    reward_out, bon_out = tmp_path / "reward", tmp_path / "best-of-n"
    assert main(["reward", "--model", str(tiny_chat_model_dir), "--output-dir", str(reward_out), "difficulties=1",
                 "train_problems=6", "samples=4", "test_problems=4", "test_samples=4", "hacking_samples=4",
                 "steps=2", "batch_size=4", "warmup_steps=1"]) == 0
    summary = json.loads((reward_out / "summary.json").read_text())
    assert sorted(summary["reward_models"]) == ["orm"] and (reward_out / "orm" / "head.safetensors").exists()
    assert summary["metrics"]["test_solutions"] == 16 and summary["baseline"]["scorer"] == "policy mean token log-prob"
    assert main(["best-of-n", "--model", str(tiny_chat_model_dir), "--output-dir", str(bon_out), "difficulties=1",
                 f"reward_models={reward_out}", "problems=3", "max_n=4", "headline_n=2", "max_new_tokens=6"]) == 0
    curves = json.loads((bon_out / "summary.json").read_text())["metrics"]["by_n"]
    assert set(curves) == {"n", "orm", "majority", "oracle"} and curves["n"] == [1, 2, 4]
    assert all(o >= m for o, m in zip(curves["oracle"], curves["orm"]))  # pass@N bounds every selector


def test_sft_on_a_chat_model_reports_accuracy_and_what_it_loses_elsewhere(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "sft"
    code = main(["sft", "--model", str(tiny_chat_model_dir), "--output-dir", str(out), "difficulties=1",
                 "steps=3", "batch_size=4", "train_examples=12", "eval_problems=4", "lr=1e-2", "warmup_steps=1"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["variants"][0] == "plain" and "forgetting" not in summary["metrics"]
    assert summary["metrics"]["general_nll"] != summary["baseline"]["general_nll"]  # trained: its replies moved
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].endswith(WORKED_REPLY) for s in samples)


def test_a_models_preset_sets_its_methods_defaults_and_the_command_line_still_wins(capsys):
    assert main(["grpo", "--model", SMOLLM2, "--show-config", "lr=3e-5"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["lr"] == 3e-5 and config["temperature"] == 0.7 and config["difficulties"] == [2]
    assert main(["grpo", "--model", "some/other-model", "--show-config"]) == 0
    assert json.loads(capsys.readouterr().out)["temperature"] == 1.0


def test_the_real_model_track_runs_the_methods_with_a_preset_for_that_model():
    chosen = selected_methods(None, None, SMOLLM2)
    assert chosen and all(METHODS[m.name].preset_overrides(SMOLLM2) for m in chosen)
    assert {"grpo", "sft"} <= {m.name for m in chosen} and "tree-search" not in {m.name for m in chosen}
    overrides = stage_overrides("grpo", False, SMOLLM2)
    assert overrides[-1] == f"model={SMOLLM2}" and "lr=1e-05" in overrides


def test_the_comparison_table_shows_what_a_chat_model_loses_only_when_a_run_measured_it():
    from posttrain.report.table import comparison_rows, to_csv, to_markdown

    measured = {"metrics": {"accuracy": 0.9, "general_nll": 0.95}, "baseline": {"accuracy": 0.1, "general_nll": 0.72},
                "params": {"trainable": 10, "total": 10}, "time_s": 5.0}
    plain = {"metrics": {"accuracy": 0.5}, "baseline": {"accuracy": 0.4}, "params": {}, "time_s": 1.0}
    table = to_markdown(comparison_rows({"sft": measured, "grpo": plain}))
    assert "NLL elsewhere before | NLL elsewhere after |" in table and "| 0.720 | 0.950 |" in table
    assert "NLL elsewhere" not in to_markdown(comparison_rows({"grpo": plain}))
    assert to_csv(comparison_rows({"grpo": plain})).splitlines()[0].endswith(",KL")


def test_a_demo_with_a_model_no_selected_method_fits_says_which_do(tmp_path, capsys):
    code = main(["demo", "--model", SMOLLM2, "--method", "tree-search", "--output-dir", str(tmp_path / "demo")])
    assert code == 2
    error = capsys.readouterr().err
    assert "no selected method has settings for --model posttrain:smollm2-135m" in error and "grpo" in error
