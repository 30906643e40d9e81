"""Self-training from the policy's own verified samples: expert iteration (STaR) and online DPO."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.data import pad_batch
from posttrain.errors import UserError
from posttrain.losses.sft import IGNORE
from posttrain.methods.rl import dpo, expert_iteration, grpo, online_dpo
from posttrain.methods.rl.dpo import group_pairs
from posttrain.methods.rl.expert_iteration import verified_rows
from posttrain.rollouts import Rollouts


def hand_rollouts(texts: list[str], rewards: list[float], stopped: list[bool]) -> Rollouts:
    """Rollouts whose row i is prompt [1, 2] and completion [10 + i, 3]: each row tells which sample it is."""
    rows = [([1, 2, 10 + i, 3], [IGNORE, IGNORE, 10 + i, 3]) for i in range(len(texts))]
    return Rollouts(["q"] * len(texts), texts, torch.tensor(rewards), pad_batch(rows, 0), stopped)


def sample_ids(rows: list) -> list[int]:
    """Which sample each (input_ids, labels) row is (hand_rollouts' numbering)."""
    return [ids[2] - 10 for ids, _ in rows]


# Two prompts of 4 samples. Prompt 1: all right, sample 1 repeats sample 0's text, sample 3 was cut at the budget.
# Prompt 2: samples 5 and 7 right, 4 and 6 wrong, all finished, all distinct.
TEXTS = ["a", "a", "b", "c", "w", "x", "y", "z"]
REWARDS = [1, 1, 1, 1, 0, 1, 0, 1]
STOPPED = [True, True, True, False, True, True, True, True]


def test_the_filter_keeps_the_right_finished_samples_once_each():
    """Prompt 1 keeps 0 and 2 (1 repeats 0's text, 3 never ended); prompt 2 its right ones, 5 and 7; capped at one
    per prompt, the first of each: 0 and 5."""
    rollouts = hand_rollouts(TEXTS, REWARDS, STOPPED)
    assert sample_ids(verified_rows(rollouts, 4)) == [0, 2, 5, 7]
    assert sample_ids(verified_rows(rollouts, 4, max_per_prompt=1)) == [0, 5]
    assert verified_rows(rollouts, 4)[1] == rollouts.row(2)  # the row as sampled: prompt and completion ids, labels


def test_online_pairs_are_right_and_wrong_of_one_prompt_and_none_where_a_group_agrees():
    """Prompt 1's samples are all right: no pair. Prompt 2: right (5, 7) zipped with wrong (4, 6): (5, 4) and (7, 6);
    at one pair per prompt, (5, 4)."""
    rollouts = hand_rollouts(TEXTS, REWARDS, STOPPED)
    pairs = group_pairs(rollouts, 4, pairs_per_prompt=2)
    assert [tuple(sample_ids(pair)) for pair in pairs] == [(5, 4), (7, 6)]
    assert [tuple(sample_ids(pair)) for pair in group_pairs(rollouts, 4, pairs_per_prompt=1)] == [(5, 4)]
    assert group_pairs(hand_rollouts(TEXTS, [0] * 8, STOPPED), 4, pairs_per_prompt=2) == []


def test_settings_out_of_range_name_the_key():
    with pytest.raises(UserError, match="rounds"):
        load_config(expert_iteration.ExpertIterationConfig, None, ["rounds=0"])
    with pytest.raises(UserError, match="loss_type.*sigmoid, ipo"):
        load_config(online_dpo.OnlineDPOConfig, None, ["loss_type=kto"])
    with pytest.raises(UserError, match="num_generations"):
        load_config(online_dpo.OnlineDPOConfig, None, ["num_generations=1"])


def test_the_defaults_sample_as_much_as_what_they_are_compared_with():
    """Expert iteration draws GRPO's completions; online DPO draws offline DPO's and takes as many steps."""
    ei, grpo_cfg = expert_iteration.ExpertIterationConfig(), grpo.GRPOConfig()
    assert ei.rounds * ei.prompts_per_round * ei.num_generations == \
        grpo_cfg.steps * grpo_cfg.prompts_per_step * grpo_cfg.num_generations
    online, offline = online_dpo.OnlineDPOConfig(), dpo.DPOConfig()
    assert online.rounds * online.prompts_per_round * online.num_generations == \
        offline.pair_prompts * offline.samples_per_prompt
    assert online.rounds * online.steps == offline.steps


# ---- end to end on a tiny random model and a user's prompt/answer records ------------------------------------------

ROUNDS, PROMPTS, G, STEPS = 2, 3, 4, 2


def answer_records(path) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}\n", "answer": a + b}) + "\n"
                            for a in range(10, 15) for b in range(20, 24)))  # 20 records: 2 held out
    return str(path)


def every_other_right(prompts, completions, answers) -> list[float]:
    """A stand-in verifier: of each group of G samples, the 1st and 3rd are right (a random model is never)."""
    return [float(i % 2 == 0) for i in range(len(completions))]


@pytest.fixture
def stand_in_verifier(monkeypatch):
    """The verifier above, and every sample counted as finished (a random model rarely ends within the budget)."""
    sample = expert_iteration.sample_rollouts

    def finished(*args, **kwargs):
        rollouts = sample(*args, **kwargs)
        return dataclasses.replace(rollouts, stopped=[True] * len(rollouts.texts))

    monkeypatch.setattr(expert_iteration, "verifier", lambda records, tokenizer: every_other_right)
    monkeypatch.setattr(online_dpo, "verifier", lambda records, tokenizer: every_other_right)
    monkeypatch.setattr(expert_iteration, "sample_rollouts", finished)


def tiny_overrides(model_dir, data: str, out) -> list[str]:
    return [f"model={model_dir}", f"data={data}", f"output_dir={out}", f"rounds={ROUNDS}",
            f"prompts_per_round={PROMPTS}", f"num_generations={G}", f"steps={STEPS}", "batch_size=4",
            "max_new_tokens=12", "kl_problems=2", "warmup_steps=1", "lr=1e-2", "log_every=1"]


def check_round_files(out, summary: dict, start_weights: dict) -> list[dict]:
    """What both methods write: summary keys, one metrics.jsonl line per round (the `eval/` frontier keys on every
    round's but the last), the frontier's steps, the plots, and a policy that moved."""
    assert summary["metrics"]["samples_drawn"] == ROUNDS * PROMPTS * G
    assert {"accuracy", "kl", "rounds", "frontier"} <= set(summary["metrics"]) and "accuracy" in summary["baseline"]
    assert summary["baseline"]["n"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2] and [line["step"] for line in lines] == [STEPS, 2 * STEPS]
    assert ["eval/accuracy" in line for line in lines] == [True, False]
    assert [p["step"] for p in summary["metrics"]["frontier"]] == [0, STEPS, 2 * STEPS]
    for name in ("training_curve.png", "reward_kl_frontier.png", "samples.jsonl", "model/config.json"):
        assert (out / name).stat().st_size > 0
    trained = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], start_weights[k]) for k in start_weights)
    return lines


def test_expert_iteration_fine_tunes_on_what_the_verifier_kept(tmp_path, tiny_model_dir, stand_in_verifier):
    """Each prompt's 1st and 3rd samples are right and (texts of a random model) distinct: 2 kept per prompt."""
    data = answer_records(tmp_path / "prompts.jsonl")
    cfg = load_config(expert_iteration.ExpertIterationConfig, None, tiny_overrides(tiny_model_dir, data, tmp_path / "run"))
    summary = expert_iteration.run(cfg)
    lines = check_round_files(tmp_path / "run", summary, load_file(tiny_model_dir / "model.safetensors"))
    assert [line["kept"] for line in lines] == [2 * PROMPTS] * ROUNDS
    assert summary["metrics"]["kept_samples"] == ROUNDS * 2 * PROMPTS
    assert all(line["sampled_accuracy"] == 0.5 and line["loss"] > 0 for line in lines)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "expert-iteration"


def test_online_dpo_trains_on_each_rounds_pairs(tmp_path, tiny_model_dir, stand_in_verifier):
    """Right (1st, 3rd) zipped with wrong (2nd, 4th): 2 pairs per prompt each round; DPO's summary keys."""
    data = answer_records(tmp_path / "prompts.jsonl")
    cfg = load_config(online_dpo.OnlineDPOConfig, None, tiny_overrides(tiny_model_dir, data, tmp_path / "run"))
    summary = online_dpo.run(cfg)
    lines = check_round_files(tmp_path / "run", summary, load_file(tiny_model_dir / "model.safetensors"))
    assert [line["pairs"] for line in lines] == [2 * PROMPTS] * ROUNDS
    metrics = summary["metrics"]
    assert metrics["pairs"] == ROUNDS * 2 * PROMPTS and metrics["completions_sampled"] == metrics["samples_drawn"]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "sampled_accuracy"} <= set(metrics)
    assert lines[-1]["rewards/margins"] > 0  # the policy moved toward the chosen samples, away from the rejected


def test_a_run_does_not_pretend_to_resume(tmp_path):
    cfg = load_config(online_dpo.OnlineDPOConfig, None, [f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="cannot continue an interrupted run"):
        online_dpo.run(cfg, resume=True)


# ---- the quick run from the cached quick policy (builds it once: run last) ---------------------------------------

@pytest.mark.xfail(reason="not yet tuned: the quick policy's right samples are often right by wrong steps, and "
                          "training on them has lowered its held-out accuracy (expert_iteration's docstring)")
@pytest.mark.parametrize("module", [expert_iteration, online_dpo], ids=["expert-iteration", "online-dpo"])
def test_quick_run_raises_held_out_accuracy_over_the_quick_policy(tmp_path, module):
    overrides = [f"{k}={v}" for k, v in module.QUICK.items()] + [f"output_dir={tmp_path}"]
    summary = module.run(load_config(module.CONFIG, None, overrides))
    assert summary["metrics"]["accuracy"] > summary["baseline"]["accuracy"]
