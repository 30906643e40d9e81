"""KTO and ORPO: the losses against hand-derived values and TRL's code, their data, and quick runs end to end."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.losses.kto import kl_reference_point, kto_loss
from posttrain.losses.orpo import log_odds, odds_ratio_term, orpo_loss
from posttrain.losses.sft import IGNORE
from posttrain.methods.rl import kto, orpo

I = IGNORE


def two_examples(**kw):
    """A desirable example with log-ratio r = +1 (-10 under the policy, -11 under the reference) and an
    undesirable one with r = -1 (-12 and -11)."""
    values = {"policy_logps": torch.tensor([-10.0, -12.0]), "ref_logps": torch.tensor([-11.0, -11.0]),
              "desirable_mask": torch.tensor([True, False]), "beta": 0.5, "desirable_weight": 1.0,
              "undesirable_weight": 2.0, **kw}
    return values


def test_kto_loss_by_hand_with_the_reference_point_clamped_at_zero():
    """Mismatched log-ratios average -0.5 < 0, so z0 = 0. Desirable: 1 - sigmoid(0.5 * 1) = 0.377541;
    undesirable (w_U = 2): 2 - 2 sigmoid(0.5 * (0 + 1)) = 0.755081."""
    z0 = kl_reference_point(torch.tensor([-11.0, -12.0]), torch.tensor([-11.0, -11.0]))
    assert z0.item() == 0.0
    losses = kto_loss(**two_examples(kl_ref_point=z0))
    assert losses.tolist() == pytest.approx([0.377541, 0.755081], abs=1e-6)


def test_kto_loss_by_hand_with_a_positive_reference_point():
    """Mismatched log-ratios 0.2 and 0.6: z0 = 0.4. Desirable: 1 - sigmoid(0.5 * (1 - 0.4)) = 0.425557;
    undesirable: 2 - 2 sigmoid(0.5 * (0.4 + 1)) = 0.663624: a higher bar for the desirable, a lower one
    for the undesirable."""
    z0 = kl_reference_point(torch.tensor([-10.8, -10.4]), torch.tensor([-11.0, -11.0]))
    assert z0.item() == pytest.approx(0.4, abs=1e-6)
    assert kto_loss(**two_examples(kl_ref_point=z0)).tolist() == pytest.approx([0.425557, 0.663624], abs=1e-6)


def test_kto_pushes_desirable_up_and_undesirable_down_and_not_through_the_reference_point():
    policy = torch.tensor([-10.0, -12.0], requires_grad=True)
    mismatched = torch.tensor([-10.8, -10.4], requires_grad=True)
    z0 = kl_reference_point(mismatched, torch.tensor([-11.0, -11.0]))
    kto_loss(**two_examples(policy_logps=policy, kl_ref_point=z0)).sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]
    assert mismatched.grad is None  # z0 is detached


def test_orpo_odds_ratio_by_hand():
    """log odds(-0.5) = -0.5 - log(1 - e^-0.5) = 0.432752, log odds(-1) = -1 - log(1 - e^-1) = -0.541325;
    L_OR = log(1 + e^-0.974077) = 0.320300; with the chosen NLL 0.5 and lambda 0.1: 0.5 + 0.032030."""
    chosen, rejected = torch.tensor([-0.5]), torch.tensor([-1.0])
    assert log_odds(chosen).item() == pytest.approx(0.432752, abs=1e-6)
    assert log_odds(rejected).item() == pytest.approx(-0.541325, abs=1e-6)
    assert odds_ratio_term(chosen, rejected).item() == pytest.approx(0.320300, abs=1e-6)
    assert orpo_loss(chosen, rejected, -chosen, lam=0.1).item() == pytest.approx(0.532030, abs=1e-6)


def test_log_odds_stay_finite_with_finite_gradients_at_the_edges():
    """Near logp = 0 (1 - exp(logp) cancels) and far below it (exp underflows) the log odds stay accurate."""
    logp = torch.tensor([0.0, -1e-9, -1e-4, -50.0], requires_grad=True)
    odds = log_odds(logp)
    assert torch.isfinite(odds).all()
    assert odds[2].item() == pytest.approx(-1e-4 - math.log(-math.expm1(-1e-4)), rel=1e-5)
    assert odds[3].item() == pytest.approx(-50.0, abs=1e-6)
    odds_ratio_term(logp[:2], logp[2:]).sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_orpo_raises_the_chosen_and_lowers_the_rejected():
    chosen, rejected = torch.tensor([-0.5], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    orpo_loss(chosen, rejected, -chosen, lam=0.1).sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_orpo_term_matches_trl():
    """TRL's ORPOTrainer.odds_ratio_loss on a stand-in trainer returns lambda * log sigmoid(log odds ratio)."""
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(6, generator=g) * 3, -torch.rand(6, generator=g) * 3
    trainer = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    want = orpo_trainer.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)[0]
    assert torch.allclose(0.2 * odds_ratio_term(chosen, rejected), -want, atol=1e-6)


def test_orpo_trains_without_a_reference(tiny_model_dir, tokenizer):
    """ORPO's loss on a pair batch needs nothing but the policy: no reference log-probs in the batch."""
    from posttrain.methods.rl.dpo import pair_tensors
    from posttrain.models import load_model

    model = load_model(str(tiny_model_dir))[0]
    rows = [(tokenizer("Q: 1+1\nA: 2")["input_ids"], tokenizer("Q: 1+1\nA: 3")["input_ids"])]
    pairs = [tuple((ids, [I] * 4 + ids[4:]) for ids in pair) for pair in rows]
    batch = pair_tensors(pairs, tokenizer.pad_token_id)
    value, metrics = orpo.orpo_loss_fn(0.1)(model, batch)
    value.backward()
    assert metrics["nll_loss"] > 0 and math.isfinite(metrics["log_odds_chosen"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---- KTO's data --------------------------------------------------------------------------------------------

def test_mismatched_partners_take_the_next_prompts_completions():
    prompts = ["a", "a", "b", "c", "c"]
    partners = kto.mismatched_partners(prompts)
    assert partners == [2, 2, 3, 0, 1]
    assert all(prompts[i] != prompts[j] for i, j in enumerate(partners))


def test_a_mismatched_row_is_one_prompt_with_another_completion():
    row, other = ([1, 2, 3, 4], [I, I, 3, 4]), ([5, 6, 7, 8, 9], [I, I, I, 8, 9])
    assert kto.with_completion_of(row, other) == ([1, 2, 8, 9], [I, I, 8, 9])


def test_ranking_accuracy_counts_desirable_over_undesirable_pairs():
    """Desirable scores 0 and -2, undesirable -1 and -3: 3 of the 4 pairs are ranked right."""
    scores, desirable = torch.tensor([0.0, -1.0, -2.0, -3.0]), torch.tensor([True, False, True, False])
    assert kto.ranking_accuracy(scores, desirable) == 0.75


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unpaired_label_must_be_a_boolean(tmp_path):
    data = write_lines(tmp_path / "labelled.jsonl", [{"prompt": "Q: 1+1\n", "completion": "A: 2", "label": True},
                                                     {"prompt": "Q: 1+2\n", "completion": "A: 3", "label": "yes"}])
    cfg = load_config(kto.KTOConfig, None, [f"data={data}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"labelled.jsonl:2: field 'label' must be true .* got str"):
        kto.run(cfg)


def test_unpaired_data_of_one_label_is_refused_before_anything_slow(tmp_path):
    data = write_lines(tmp_path / "labelled.jsonl", [{"prompt": "Q: 1+1\n", "completion": "A: 2", "label": True}] * 3)
    cfg = load_config(kto.KTOConfig, None, [f"data={data}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"every record has 'label' true"):
        kto.run(cfg)
    assert not (tmp_path / "run").exists()


def test_kto_on_user_records(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Q: {a}+{b}\n", "completion": f"A: {a + b + wrong}", "label": not wrong}
            for a in range(10, 14) for b in range(20, 23) for wrong in (0, 1)]
    data = write_lines(tmp_path / "labelled.jsonl", rows)
    cfg = load_config(kto.KTOConfig, None, [f"model={tiny_model_dir}", f"data={data}", "steps=3", "batch_size=8",
                                            "warmup_steps=1", "eval_every=0", f"output_dir={tmp_path / 'run'}"])
    summary = kto.run(cfg)
    metrics = summary["metrics"]
    assert metrics["desirable"] == 11 and metrics["undesirable"] == 11  # one of each label's 12 held out
    assert metrics["n"] == 2 and 0 <= metrics["accuracy"] <= 1 and metrics["kl"] >= 0
    assert "kl_ref_point" in metrics and summary["method"] == "kto"


# ---- the methods, end to end on the quick policy ------------------------------------------------------------

def quick_run(capsys, method: str, out) -> tuple[dict, list[dict]]:
    assert main([method, "--quick", "--output-dir", str(out), "log_every=1"]) == 0
    capsys.readouterr()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), lines


def early_and_late(lines: list[dict], key: str) -> tuple[float, float]:
    """Means of `key` over the first and the last five logged steps (one step's batch is noisy)."""
    values = [line[key] for line in lines if key in line]
    return sum(values[:5]) / 5, sum(values[-5:]) / 5


def test_kto_quick_run(capsys, tmp_path):
    """On the quick policy's own labelled samples the loss falls. (Its held-out accuracy falls too, unlike the
    default run's: kto.py's docstring says why; this test does not assert a gain KTO does not make here.)"""
    summary, lines = quick_run(capsys, "kto", tmp_path)
    early, late = early_and_late(lines, "loss")
    assert late < early
    assert summary["metrics"]["desirable"] > 0 and summary["metrics"]["undesirable"] > 0
    assert {"accuracy", "kl", "frontier"} <= set(summary["metrics"]) and "accuracy" in summary["baseline"]
    assert (tmp_path / "model" / "config.json").exists()


def test_orpo_quick_run(capsys, tmp_path):
    """On the policy's own pairs the loss falls and the chosen completions' log odds rise against the rejected."""
    summary, lines = quick_run(capsys, "orpo", tmp_path)
    early, late = early_and_late(lines, "loss")
    assert late < early
    early, late = early_and_late(lines, "log_odds_chosen")
    assert late > early
    assert summary["method"] == "orpo" and summary["metrics"]["pairs"] > 0
    assert {"accuracy", "kl", "frontier"} <= set(summary["metrics"]) and "accuracy" in summary["baseline"]
