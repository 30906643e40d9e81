"""Defaults by model: a user's model or data never builds the embedded world's stages, a large model trains at
TRL's learning rates unless told otherwise, lora on a user's data trains one adapter, and a warmup longer than
half the run is capped."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

import posttrain.models
import posttrain.stages
from posttrain.cli import build_parser, main, method_config, parse
from posttrain.methods import METHODS
from posttrain.models import parameter_count
from posttrain.training import TrainingConfig, lr_lambda


@pytest.fixture
def no_stages(monkeypatch):
    """Any attempt to build (or read) a cached stage fails the test."""
    def refuse(method, overrides=()):
        raise AssertionError(f"stage '{method}' was asked for")

    monkeypatch.setattr(posttrain.stages, "cached_run", refuse)


@pytest.fixture(scope="module")
def large_model_dir(tmp_path_factory, tokenizer):
    """A user's model folder of a 58M-parameter Llama: its config and tokenizer only (no weights are needed to
    count its parameters)."""
    path = tmp_path_factory.mktemp("large-model")
    LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, tie_word_embeddings=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def config_of(*argv):
    args = parse(build_parser(), list(argv))
    return method_config(METHODS[args.command], args)[1]


def cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_warmup_longer_than_half_the_run_is_capped_at_half(capsys):
    """steps=5, warmup_steps=20: warmup over 5 // 2 = 2 steps (1/2, then the peak at the second step), then the
    cosine from 1 to min_lr_ratio over the remaining 3: 0.1 + 0.45 (1 + cos(pi t / 3)) at t = 0, 1, 2."""
    f = lr_lambda(TrainingConfig(steps=5, warmup_steps=20, min_lr_ratio=0.1))
    assert "warmup_steps=20 capped at 2" in capsys.readouterr().out
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * 1.5, 0.1 + 0.45 * 0.5]
    assert [f(s) for s in range(5)] == pytest.approx(expected)
    # warmup_steps <= steps / 2: the schedule of old, and no line
    g = lr_lambda(TrainingConfig(steps=10, warmup_steps=5, min_lr_ratio=0.1))
    assert [g(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert g(10) == pytest.approx(0.1) and capsys.readouterr().out == ""


def test_parameter_count_equals_the_loaded_models_without_its_weights(tiny_model_dir, tmp_path):
    loaded = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert parameter_count(str(tiny_model_dir)) == loaded
    config_only = tmp_path / "config-only"
    LlamaConfig.from_pretrained(tiny_model_dir).save_pretrained(config_only)  # no weights file at all
    assert parameter_count(str(config_only)) == loaded


def test_large_parameter_count_is_the_formula(large_model_dir):
    """Embeddings and head 2 x 32000 x 512, per layer 4 x 512^2 attention + 3 x 512 x 1376 MLP + 2 x 512 norms,
    and the final norm."""
    per_layer = 4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512
    assert parameter_count(large_model_dir) == 2 * 32000 * 512 + 8 * per_layer + 512


def test_large_model_gets_trls_learning_rate_below_yaml_and_flags(large_model_dir, tmp_path, capsys):
    cfg = config_of("sft", "--model", large_model_dir)
    assert cfg.lr == 2e-5
    assert "58M-parameter model: TRL's defaults lr=2e-05" in capsys.readouterr().err
    yaml = tmp_path / "run.yaml"
    yaml.write_text("lr: 1.0e-4\n")
    assert config_of("sft", "--model", large_model_dir, "--config", str(yaml)).lr == 1e-4
    assert config_of("sft", "--model", large_model_dir, "lr=3e-5").lr == 3e-5
    assert config_of("sft", "--model", large_model_dir, "learning_rate=4e-5").lr == 4e-5  # TRL's name counts
    assert "TRL's defaults" not in capsys.readouterr().err  # nothing left to apply: no line


def test_large_model_defaults_sit_under_a_preset_and_replace_quicks(large_model_dir, monkeypatch):
    monkeypatch.setattr(METHODS["sft"].load(), "PRESETS", {large_model_dir: {"lr": 1e-4}})
    assert config_of("sft", "--model", large_model_dir).lr == 1e-4
    # --quick's lr=3e-3 is the quick embedded model's: a large model keeps TRL's
    cfg = config_of("cot-ft", "--quick", "--model", large_model_dir)
    assert cfg.lr == 2e-5 and cfg.steps == 140
    lora = config_of("lora", "--model", large_model_dir, "full_ft=true")
    assert (lora.lr, lora.full_ft_lr, lora.full_ft) == (2e-4, 2e-5, True)


@pytest.mark.parametrize("method, lr", [("dpo", 1e-6), ("grpo", 1e-6), ("ppo", 3e-6), ("reward", 1e-4),
                                        ("distill", 2e-5), ("instruction", 2e-5)])
def test_each_training_method_has_trls_rate_for_a_large_model(large_model_dir, method, lr):
    assert config_of(method, "--model", large_model_dir).lr == lr


def test_small_and_embedded_models_keep_the_defaults(tiny_model_dir, monkeypatch, capsys):
    assert config_of("sft", "--model", str(tiny_model_dir)).lr == 1e-3  # a few thousand parameters: not large
    assert "TRL's defaults" not in capsys.readouterr().err

    def refuse(name):
        raise AssertionError(f"counted the parameters of '{name}'")

    monkeypatch.setattr(posttrain.models, "parameter_count", refuse)
    assert config_of("sft").lr == 1e-3
    assert config_of("sft", "--model", "posttrain:smollm2-135m").lr == 1e-4  # its preset, uncounted
    assert config_of("dpo", "--model", "sft-policy-quick").lr == 5e-5


def test_cot_prompt_with_a_users_model_skips_the_fine_tuned_comparison(tiny_model_dir, tmp_path, no_stages, capsys,
                                                                         monkeypatch):
    code, out, err = cli(capsys, "cot-prompt", "--model", str(tiny_model_dir), "--show-config")
    assert code == 0 and json.loads(out)["finetuned"] == "" and "finetuned=''" in err

    class Evaluating(Exception):
        """The run got past choosing its models (where a stage would be built) to evaluating them."""

    def evaluate_model(name, difficulties, cfg):
        raise Evaluating(name)

    monkeypatch.setattr(METHODS["cot-prompt"].load(), "evaluate_model", evaluate_model)
    with pytest.raises(Evaluating, match="tiny-model"):
        main(["cot-prompt", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run")])
    # asked for, the comparison is still run: its stage is asked for (refused here) before any evaluation
    with pytest.raises(AssertionError, match="stage 'sft'"):
        main(["cot-prompt", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
              "finetuned=sft-policy"])


@pytest.mark.parametrize("method, key", [("distill", "teacher"), ("tree-search", "reward_models")])
def test_a_users_model_fails_fast_naming_the_key_before_any_stage(tiny_model_dir, tmp_path, no_stages, capsys,
                                                                  method, key):
    code, _, err = cli(capsys, method, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"))
    assert code == 2 and f"{key}=" in err


def test_best_of_n_on_a_users_model_selects_by_majority_without_building_a_reward_model(tiny_model_dir, tmp_path,
                                                                                         no_stages, capsys):
    """Without reward_models, best-of-N on a user's model uses the answers it has (the verifier, majority vote)
    rather than building the embedded world's reward models."""
    code, _, _ = cli(capsys, "best-of-n", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                     "problems=4", "max_n=2", "headline_n=2", "difficulties=1")
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert code == 0 and metrics["headline"] == "best-of-2 with majority vote" and "majority" in metrics["by_n"]


@pytest.mark.parametrize("method", ["dpo", "grpo", "ppo", "reward", "best-of-n", "self-consistency"])
def test_data_without_model_names_model_instead_of_building_the_policy(tmp_path, no_stages, capsys, method):
    code, _, err = cli(capsys, method, "--data", str(tmp_path / "records.jsonl"), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "give --model" in err and "model=sft-policy uses it anyway" in err
    code, _, err = cli(capsys, method, "--quick", "--data", str(tmp_path / "records.jsonl"), "--show-config")
    assert code == 2 and "model=sft-policy-quick uses it anyway" in err
    # named, the policy is the user's choice
    assert cli(capsys, method, "--data", "records.jsonl", "model=sft-policy-quick", "--show-config")[0] == 0


def test_lora_on_a_users_data_defaults_to_one_adapter(tiny_model_dir, tmp_path, no_stages, capsys):
    for argv in (["--data", "d.jsonl"], ["--quick", "--data", "d.jsonl", "--model", str(tiny_model_dir)],
                 ["--model", str(tiny_model_dir)]):
        cfg = config_of("lora", *argv)
        assert (cfg.ranks, cfg.full_ft) == ([], False), argv
    asked = config_of("lora", "--data", "d.jsonl", "ranks=1,2", "full_ft=true")
    assert (asked.ranks, asked.full_ft) == ([1, 2], True)
    assert config_of("lora").ranks == [1, 2, 4, 8, 16]  # the embedded world's experiment keeps its sweep

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {a}+1\n", "completion": f"A: {a + 1}"}) + "\n"
                            for a in range(20)))
    code, _, err = cli(capsys, "lora", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                       str(tmp_path / "run"), "steps=2", "batch_size=4", "warmup_steps=0", "magnitude_every=0")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["full_ft"] is None and summary["metrics"]["rank_sweep"] == []
    assert not (tmp_path / "run" / "runs").exists()  # no other model trained
    assert 0 <= summary["metrics"]["accuracy"] <= 1
