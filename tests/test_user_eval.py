"""Evaluation on a user's records (--data): held-out splits capped by the config, held-out NLL for SFT,
held-out preference accuracy for DPO and reward models, held-out mean reward for GRPO; checked on a tiny
random model against hand computations."""
import json

import pytest
import torch

from posttrain.config import load_config
from posttrain.methods.finetuning import lora, sft
from posttrain.methods.rl import dpo, grpo, reward_model
from posttrain.models import load_model
from posttrain.records import read_preferences, read_sft, split_records
from posttrain.reward_models import load_reward_model

WORLD_CONFIG = {"skill", "difficulties", "format", "train_examples", "slip_rate", "old_skills", "old_skill_problems"}
WORLD_METRICS = {"old_skills", "forgetting", "best_mitigation", "by_difficulty", "step_accuracy", "general_nll"}


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sft_records(tmp_path, n: int = 40) -> str:
    return write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Q: {i}+{i}\n", "completion": f"A: {2 * i}"} for i in range(n)])


def preference_records(tmp_path, n: int = 40) -> str:
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q: {i}+{i}\n", "chosen": f"A: {2 * i}",
                                                   "rejected": f"A: {2 * i + 1} and more"} for i in range(n)])


@torch.no_grad()
def completion_logps(model, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each completion token (EOS included), from one unpadded forward pass."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = model.eval()(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # position t predicts token t + 1
    targets = ids[0, len(prompt_ids):]
    return logp[len(prompt_ids) - 1 :].gather(1, targets[:, None]).squeeze(1)


def run_sft(tmp_path, tiny_model_dir, monkeypatch, *extra: str) -> tuple[dict, list]:
    """An SFT run on 40 records (a tenth is 4) with eval_problems=2; also every generate call's prompts and desc."""
    calls = []
    generate = sft.generate

    def counting_generate(model, tokenizer, prompts, **kwargs):
        calls.append((len(prompts), kwargs.get("desc")))
        return generate(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(sft, "generate", counting_generate)
    cfg = load_config(sft.SFTConfig, None, [f"model={tiny_model_dir}", f"data={sft_records(tmp_path)}", "steps=2",
                                            "batch_size=4", "warmup_steps=1", "lr=1e-2", "eval_problems=2",
                                            "variants=plain", f"output_dir={tmp_path / 'run'}", *extra])
    return sft.run(cfg), calls


def test_sft_evaluates_at_most_eval_problems_records_with_a_progress_bar(tmp_path, tiny_model_dir, monkeypatch):
    summary, calls = run_sft(tmp_path, tiny_model_dir, monkeypatch)
    assert summary["baseline"]["n"] == summary["metrics"]["n"] == 2  # of the 4 held out
    assert calls == [(2, "greedy answers to 2 held-out records")] * 2  # before and after


def test_split_records_caps_the_held_out_tenth_and_keeps_the_training_records():
    records = list(range(100))
    train, held = split_records(records, seed=3)
    capped_train, capped = split_records(records, seed=3, limit=4)
    assert len(held) == 10 and capped == held[:4] and capped_train == train
    assert split_records(records, seed=4, limit=4)[1] != capped  # the seed decides which


def test_sft_heldout_nll_is_the_mean_nll_per_completion_token(tmp_path, tiny_model_dir, monkeypatch):
    summary, _ = run_sft(tmp_path, tiny_model_dir, monkeypatch)
    held = split_records(read_sft(summary["config"]["data"]), summary["config"]["seed"], limit=2)[1]
    for part, path in (("baseline", tiny_model_dir), ("metrics", tmp_path / "run" / "model")):
        model, tokenizer = load_model(str(path))
        logps = torch.cat([completion_logps(model, tokenizer, r.prompt, r.completion) for r in held])
        assert summary[part]["heldout_nll"] == pytest.approx(-logps.mean().item(), rel=1e-5)
    assert summary["metrics"]["heldout_nll"] < summary["baseline"]["heldout_nll"]  # trained on the same kind of data


def test_sft_on_user_data_writes_samples_and_no_world_keys(tmp_path, tiny_model_dir, monkeypatch):
    summary, _ = run_sft(tmp_path, tiny_model_dir, monkeypatch)
    completions = {r.prompt: r.completion for r in read_sft(summary["config"]["data"])}
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["reference"] == completions[row["prompt"]]
        assert row["correct"] == (row["completion"].strip() == row["reference"].strip())
    assert not set(summary["config"]) & WORLD_CONFIG
    assert not (set(summary["metrics"]) | set(summary["baseline"])) & WORLD_METRICS
    assert {"heldout_nll", "accuracy"} <= set(summary["metrics"]) & set(summary["baseline"])


def test_lora_on_user_data_reports_heldout_nll_and_writes_samples(tmp_path, tiny_model_dir):
    cfg = load_config(lora.LoRAConfig, None, [f"model={tiny_model_dir}", f"data={sft_records(tmp_path)}", "steps=2",
                                              "batch_size=4", "warmup_steps=1", "eval_problems=3", "ranks=",
                                              "full_ft=false", "magnitude_every=0", f"output_dir={tmp_path / 'run'}"])
    summary = lora.run(cfg)
    assert summary["baseline"]["n"] == summary["metrics"]["n"] == 3
    assert summary["metrics"]["heldout_nll"] > 0 and summary["baseline"]["heldout_nll"] > 0
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 3
    assert not set(summary["config"]) & WORLD_CONFIG


def test_the_cli_prints_the_heldout_nll_of_user_sft(tmp_path, tiny_model_dir, capsys):
    from posttrain.cli import main

    out = tmp_path / "run"
    assert main(["sft", "--data", sft_records(tmp_path), "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "steps=2", "batch_size=4", "eval_problems=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    nll, match = ([f"{summary[p][k]:.3f}" for p in ("baseline", "metrics")] for k in ("heldout_nll", "accuracy"))
    assert f"sft: held-out NLL {nll[0]} -> {nll[1]} (exact match {match[0]} -> {match[1]}) (" in capsys.readouterr().out


def test_dpo_held_out_preference_accuracy_is_the_share_of_positive_implicit_margins(tmp_path, tiny_model_dir):
    data = preference_records(tmp_path)
    cfg = load_config(dpo.DPOConfig, None, [f"model={tiny_model_dir}", f"data={data}", "steps=2", "batch_size=4",
                                            "warmup_steps=1", "lr=1e-2", "eval_every=0", "eval_problems=3",
                                            f"output_dir={tmp_path / 'run'}"])
    summary = dpo.run(cfg)
    held = split_records(read_preferences(data), summary["config"]["seed"], limit=3)[1]
    (policy, tokenizer), reference = load_model(str(tmp_path / "run" / "model")), load_model(str(tiny_model_dir))[0]

    def log_ratio(prompt: str, completion: str) -> float:
        return (completion_logps(policy, tokenizer, prompt, completion).sum()
                - completion_logps(reference, tokenizer, prompt, completion).sum()).item()

    margins = [log_ratio(r.prompt, r.chosen) - log_ratio(r.prompt, r.rejected) for r in held]
    assert min(abs(m) for m in margins) > 1e-3  # no sign is decided by rounding
    assert summary["metrics"]["preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert summary["metrics"]["n"] == 3
    assert summary["baseline"]["preference_accuracy"] == 0.5  # the start policy is its own reference: every margin 0


def test_reward_model_held_out_preference_accuracy_before_and_after(tmp_path, tiny_model_dir):
    data = preference_records(tmp_path)
    cfg = load_config(reward_model.CONFIG, None, [f"model={tiny_model_dir}", f"data={data}", "steps=2",
                                                  "batch_size=4", "warmup_steps=1", "eval_pairs=3",
                                                  f"output_dir={tmp_path / 'run'}"])
    summary = reward_model.run(cfg)
    held = split_records(read_preferences(data), summary["config"]["seed"], limit=3)[1]
    orm = load_reward_model(tmp_path / "run" / "orm")
    prompts = [r.prompt for r in held]
    chosen, rejected = orm.score(prompts, [r.chosen for r in held]), orm.score(prompts, [r.rejected for r in held])
    assert summary["metrics"]["held_out_pairs"] == 3 and summary["metrics"]["train_pairs"] == 36
    assert summary["metrics"]["preference_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert 0 <= summary["baseline"]["preference_accuracy"] <= 1


def test_grpo_reports_the_held_out_mean_reward_of_its_own_reward(tmp_path, tiny_model_dir):
    """With the verifier on user prompts the reward is 1/0 by answer, so its held-out mean is the accuracy."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Q: {i}+{i}\n", "answer": 2 * i} for i in range(30)])
    cfg = load_config(grpo.GRPOConfig, None, [f"model={tiny_model_dir}", f"data={data}", "steps=2", "prompts_per_step=2",
                                              "num_generations=2", "batch_size=4", "eval_every=0", "eval_problems=2",
                                              "kl_problems=2", "max_new_tokens=8", f"output_dir={tmp_path / 'run'}"])
    summary = grpo.run(cfg)
    for part in ("baseline", "metrics"):
        assert summary[part]["n"] == 2 and summary[part]["reward"] == summary[part]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    answers = {f"Q: {i}+{i}\n": str(2 * i) for i in range(30)}
    assert len(rows) == 2 and all(row["reference"] == answers[row["prompt"]] for row in rows)
