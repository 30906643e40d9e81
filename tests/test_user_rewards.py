"""Reward functions a user brings (`reward=file.py:function`), and the warning when every reward is 0."""
import json
import math
import sys

import pytest

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.methods.rl import grpo, ppo
from posttrain.methods.test_time import self_consistency
from posttrain.records import PromptRecord
from posttrain.rewards import held_out_reward, load_user_reward, warn_if_all_zero
from posttrain.rollouts import cot_prompts, reward_function, training_problems

REWARDS = '''
def length(prompts, completions, answers, **columns):
    return [len(c) for c in completions]

def level(prompts, completions, answers, level, **columns):
    return [float(x) for x in level]

def one(prompts, completions, answers, **columns):
    return [1.0] * len(completions)

def short(prompts, completions, answers, **columns):
    return [1.0]

def nan(prompts, completions, answers, **columns):
    return [math.nan] * len(completions)

def text(prompts, completions, answers, **columns):
    return "good"

def broken(prompts, completions, answers, **columns):
    return {}["missing"]

import math
'''
RECORDS = [PromptRecord("Q: 1+2", "3", {"level": 1}), PromptRecord("Q: 2+2", "4", {"level": 2})]


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_a_users_function_gets_the_records_columns_and_weights_sum(rewards_file):
    reward = load_user_reward(f"{rewards_file}:level,{rewards_file}:one", (2.0, 0.5), RECORDS)
    assert reward(["Q: 2+2", "Q: 1+2"], ["x", "y"], ["4", "3"]) == [4.5, 2.5]
    assert load_user_reward(f"{rewards_file}:length", (), RECORDS)(["Q: 1+2"], ["abc"], ["3"]) == [3.0]


def test_reward_function_hands_user_entries_to_the_loader(rewards_file):
    reward = reward_function(f"{rewards_file}:one", records=RECORDS)
    assert reward(["Q: 1+2"], ["anything"], ["3"]) == [1.0]


def test_a_module_function_is_imported(tmp_path, monkeypatch, rewards_file):
    monkeypatch.chdir(rewards_file.parent)  # modules of the working directory import, as with `python -m`
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    assert load_user_reward("my_rewards:one")(["p"], ["c"], ["a"]) == [1.0]


@pytest.mark.parametrize("entry, message", [
    ("{dir}/nope.py:f", "reward={dir}/nope.py:f: file not found: {dir}/nope.py"),
    ("{file}:absent", "reward={file}:absent: {file} has no function 'absent' (it defines: broken, length, level,"),
    ("{file}:short", "reward={file}:short returned 1 values for 2 completions; return one float per completion"),
    ("{file}:nan", "reward={file}:nan returned nan for completion 0; rewards must be finite numbers"),
    ("{file}:text", "reward={file}:text must return a list of 2 floats"),
    ("no_such_module_here:f", "reward=no_such_module_here:f: no module 'no_such_module_here'"),
    ("{file}:", "reward: '{file}:' is not FILE.py:FUNCTION or package.module:FUNCTION"),
])
def test_loading_errors_are_one_line(rewards_file, entry, message):
    entry = entry.format(dir=rewards_file.parent, file=rewards_file)
    with pytest.raises(UserError) as info:
        load_user_reward(entry, (), RECORDS)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message.format(dir=rewards_file.parent, file=rewards_file))


def test_a_file_that_fails_to_load_is_named_with_its_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("x = 1\ndef f(:\n")
    with pytest.raises(UserError, match=rf"reward={path}:f: loading {path}:2 failed: SyntaxError"):
        load_user_reward(f"{path}:f")
    path.write_text("x = 1\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(UserError, match=rf"loading {path}:2 failed: RuntimeError: no GPU here"):
        load_user_reward(f"{path}:f")


def test_a_bug_in_the_function_keeps_its_traceback_with_a_note(rewards_file):
    with pytest.raises(KeyError) as info:
        load_user_reward(f"{rewards_file}:broken", (), RECORDS)
    assert any("raised by reward=" in note for note in info.value.__notes__)


def test_weights_must_match_the_functions(rewards_file):
    with pytest.raises(UserError, match="reward_weights has 1 values for 2 reward functions"):
        load_config(grpo.GRPOConfig, None, [f"reward={rewards_file}:one,{rewards_file}:length", "reward_weights=1"])
    with pytest.raises(UserError, match="reward_weights weigh your own reward functions"):
        load_config(ppo.PPOConfig, None, ["reward=verifier", "reward_weights=1"])
    cfg = load_config(ppo.PPOConfig, None, [f"reward={rewards_file}:one,{rewards_file}:length", "reward_weights=1,0.5"])
    assert cfg.reward_weights == [1.0, 0.5]


def test_the_held_out_reward_is_the_mean_over_greedy_completions(rewards_file):
    reward = load_user_reward(f"{rewards_file}:length", (), RECORDS)
    result = {"prompts": ["Q: 1+2", "Q: 2+2"], "completions": ["ab", "abcd"]}
    assert held_out_reward(reward, result, ["3", "4"]) == {"reward": 3.0}
    assert held_out_reward(reward, result, None) == {}


def test_all_zero_rewards_warn_in_one_line(capsys):
    assert warn_if_all_zero([0.0, 0.0], "the first batch") is True
    assert warn_if_all_zero([0.0, 1.0], "the first batch") is False
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: every reward of the first batch is 0 (2 scored)")


def gsm8k_records(path, n: int = 40, shift: int = 0) -> str:
    """World 2-digit problems as GSM8K writes them: a `question`, and a worked solution ending in `#### N`."""
    prompts, answers = cot_prompts(training_problems([2], n, seed=5))
    path.write_text("".join(json.dumps({"question": q, "answer": f"Add the columns.\n#### {int(a) + shift}",
                                        "level": 3}) + "\n" for q, a in zip(prompts, answers)))
    return str(path)


TINY = ["model=sft-policy-quick", "difficulties=2", "steps=1", "prompts_per_step=4", "num_generations=4",
        "batch_size=16", "eval_every=0", "eval_problems=4", "kl_problems=2", "temperature=0.7", "prompt_field=question",
        "max_new_tokens=72", "beta=0"]


def test_grpo_trains_and_reports_with_a_users_reward_on_gsm8k_records(tmp_path, rewards_file):
    """The user's functions score the rollouts (their columns included) and the held-out completions; the
    GSM8K-style references are read by their `#### N`, so the greedy accuracy is not 0."""
    data = gsm8k_records(tmp_path / "gsm8k.jsonl")
    cfg = load_config(grpo.GRPOConfig, None, TINY + [f"data={data}", f"output_dir={tmp_path / 'run'}",
                                                     f"reward={rewards_file}:level,{rewards_file}:one",
                                                     "reward_weights=0.5,2"])
    summary = grpo.run(cfg)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["reward"] == 3.5 and line["frac_reward_zero_std"] == 1.0  # 0.5 * level 3 + 2 * 1
    assert summary["metrics"]["reward"] == summary["baseline"]["reward"] == 3.5
    assert summary["baseline"]["accuracy"] > 0 and summary["metrics"]["all_rewards_zero"] is False


def test_ppo_trains_and_reports_with_a_users_reward(tmp_path, rewards_file):
    data = gsm8k_records(tmp_path / "gsm8k.jsonl")
    overrides = [o.replace("num_generations", "samples_per_prompt") for o in TINY if o != "beta=0"]
    summary = ppo.run(load_config(ppo.PPOConfig, None, overrides + [
        f"data={data}", f"output_dir={tmp_path / 'run'}", f"reward={rewards_file}:level"]))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["objective/scores"] == 3.0 and summary["metrics"]["reward"] == summary["baseline"]["reward"] == 3.0


def test_grpo_warns_when_its_first_rollouts_all_score_zero(tmp_path, capsys):
    data = gsm8k_records(tmp_path / "gsm8k.jsonl", shift=1000)
    summary = grpo.run(load_config(grpo.GRPOConfig, None, TINY + [f"data={data}", f"output_dir={tmp_path / 'run'}"]))
    assert summary["metrics"]["all_rewards_zero"] is True
    assert "warning: every reward of grpo's first rollout batch is 0" in capsys.readouterr().err
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["metrics"]["all_rewards_zero"] is True


def test_a_bad_reward_fails_before_any_model_loads(tmp_path, rewards_file):
    data = gsm8k_records(tmp_path / "gsm8k.jsonl")
    for method in (grpo, ppo):
        cfg = load_config(method.CONFIG, None, [f"data={data}", "prompt_field=question", f"reward={rewards_file}:short",
                                                f"model={tmp_path / 'no-model-here'}", f"output_dir={tmp_path / 'run'}"])
        with pytest.raises(UserError, match="returned 1 values for 2 completions"):
            method.run(cfg)
        assert not (tmp_path / "run").exists()


def test_self_consistency_reads_gsm8k_records_and_warns_on_a_zero_baseline(tmp_path, capsys):
    overrides = ["model=sft-policy-quick", "problems=4", "k=2", "prompt_field=question", "max_new_tokens=72"]
    right = self_consistency.run(load_config(self_consistency.CONFIG, None, overrides + [
        f"data={gsm8k_records(tmp_path / 'right.jsonl')}", f"output_dir={tmp_path / 'right'}"]))
    assert right["baseline"]["accuracy"] > 0 and right["metrics"]["all_rewards_zero"] is False
    wrong = self_consistency.run(load_config(self_consistency.CONFIG, None, overrides + [
        f"data={gsm8k_records(tmp_path / 'wrong.jsonl', shift=1000)}", f"output_dir={tmp_path / 'wrong'}"]))
    assert wrong["metrics"]["all_rewards_zero"] is True
    assert "warning: every reward of self-consistency's greedy baseline is 0" in capsys.readouterr().err


def test_non_finite_weights_are_refused(rewards_file):
    with pytest.raises(UserError, match="finite"):
        load_config(grpo.GRPOConfig, None, [f"reward={rewards_file}:one", f"reward_weights={math.inf}"])
