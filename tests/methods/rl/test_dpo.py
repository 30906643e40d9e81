"""DPO and its variants against hand-derived values and against TRL's own code."""
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.losses.dpo import DPO_LOSSES, PairLogps, conservative_dpo, dpo_sigmoid, ipo, preference_metrics, simpo
from posttrain.methods.rl import dpo


def one_pair(**kw) -> PairLogps:
    """log pi(y_w) = -10, log pi(y_l) = -12, both -11 under the reference; 5 and 4 tokens.
    Log-ratios: chosen +1, rejected -1, so the margin h = 2."""
    values = {"chosen": -10.0, "rejected": -12.0, "ref_chosen": -11.0, "ref_rejected": -11.0,
              "chosen_tokens": 5.0, "rejected_tokens": 4.0, **kw}
    return PairLogps(**{k: torch.tensor([v]) for k, v in values.items()})


def test_dpo_sigmoid_by_hand():
    """beta 0.5, h 2: -log sigmoid(1) = log(1 + e^-1) = 0.313262."""
    assert dpo_sigmoid(one_pair(), beta=0.5).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)


def test_conservative_dpo_by_hand():
    """e = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262.
    With e = 0 it is DPO itself."""
    assert conservative_dpo(one_pair(), beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.413262, abs=1e-6)
    assert conservative_dpo(one_pair(), 0.5, 0.0).item() == pytest.approx(dpo_sigmoid(one_pair(), 0.5).item())


def test_ipo_by_hand():
    """Per-token log-ratios: chosen 1/5, rejected -1/4, h_avg 0.45; beta 0.5 aims at 1/(2 * 0.5) = 1:
    (0.45 - 1)^2 = 0.3025. The loss is 0 at the target margin and grows past it (no runaway)."""
    assert ipo(one_pair(), beta=0.5).item() == pytest.approx(0.3025, abs=1e-6)
    at_target = one_pair(chosen=-11.0 + 5 * 0.5, rejected=-11.0 - 4 * 0.5)  # h_avg = 0.5 + 0.5 = 1
    assert ipo(at_target, beta=0.5).item() == pytest.approx(0.0, abs=1e-9)
    assert ipo(one_pair(chosen=0.0), beta=0.5) > 0


def test_simpo_by_hand():
    """Reference-free, per-token averages -2 and -3: beta 2, gamma 0.5 -> -log sigmoid(2 * 1 - 0.5)
    = log(1 + e^-1.5) = 0.201413; the reference log-probs do not matter."""
    assert simpo(one_pair(), beta=2.0, gamma=0.5).item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert simpo(one_pair(ref_chosen=-3.0), 2.0, 0.5).item() == pytest.approx(simpo(one_pair(), 2.0, 0.5).item())


def test_every_loss_raises_the_chosen_and_lowers_the_rejected_completion():
    options = {"sigmoid": {}, "cdpo": {"label_smoothing": 0.1}, "ipo": {}, "simpo": {"gamma": 0.5}}
    for name, loss_fn in DPO_LOSSES.items():
        chosen, rejected = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
        p = one_pair()
        p.chosen, p.rejected = chosen, rejected
        loss_fn(p, 0.5, **options[name]).sum().backward()
        assert chosen.grad.item() < 0 < rejected.grad.item(), name


def test_logged_metrics_use_trl_names_and_values():
    metrics = preference_metrics(one_pair(), beta=0.5)
    assert metrics == pytest.approx({"rewards/chosen": 0.5, "rewards/rejected": -0.5, "rewards/margins": 1.0,
                                     "rewards/accuracies": 1.0, "logps/chosen": -10.0, "logps/rejected": -12.0})


# ---- parity with TRL 1.16 (skipped when TRL is not installed) ----------------------------------------------

def random_pairs(n=6, seed=0) -> tuple[PairLogps, torch.Tensor, torch.Tensor]:
    """Pairs with per-token log-probs (2n, T): chosen rows first, as TRL concatenates them."""
    g = torch.Generator().manual_seed(seed)
    T = 9
    lengths = torch.randint(2, T, (2 * n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (2n, T)
    per_token = -torch.rand(2 * n, T, generator=g) * 3 * mask
    ref = -torch.rand(2 * n, generator=g) * 10
    p = PairLogps(per_token[:n].sum(1), per_token[n:].sum(1), ref[:n], ref[n:], lengths[:n].float(), lengths[n:].float())
    return p, per_token, mask


def trl_dpo_loss(loss_type: str, beta: float, per_token, mask, ref_chosen, ref_rejected) -> torch.Tensor:
    """TRL keeps DPO's loss inline in DPOTrainer._compute_loss; run that method on a stand-in trainer
    whose 'model' returns our per-token log-probs, with reference log-probs precomputed."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    rows, width = per_token.shape
    completion_mask = torch.cat([torch.zeros(rows, 1), mask], dim=1)  # TRL's mask is over input_ids (T + 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, label_smoothing=0.0, loss_types=[loss_type], loss_weights=[1.0],
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(rows, width + 1, dtype=torch.long), "attention_mask": torch.ones(rows, width + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("ours, loss_type", [(dpo_sigmoid, "sigmoid"), (ipo, "ipo")])
def test_parity_with_trl_dpo_trainer(ours, loss_type):
    p, per_token, mask = random_pairs()
    want = trl_dpo_loss(loss_type, 0.3, per_token, mask, p.ref_chosen, p.ref_rejected)
    assert ours(p, 0.3).mean().item() == pytest.approx(want.item(), rel=1e-5)


def trl_cpo_loss(loss_type: str, beta: float, label_smoothing: float, gamma: float, chosen, rejected) -> torch.Tensor:
    """TRL's CPOTrainer.cpo_loss (SimPO lives there), run on a stand-in trainer with the needed fields."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                              simpo_gamma=gamma, accelerator=SimpleNamespace(device="cpu"))
    return cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]


def test_parity_with_trl_simpo():
    """TRL's SimPO takes per-token averaged log-probs (CPOTrainer averages them before the loss)."""
    p, _, _ = random_pairs(seed=1)
    want = trl_cpo_loss("simpo", 2.0, 0.0, 0.8, p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens)
    assert torch.allclose(simpo(p, 2.0, 0.8), want, atol=1e-6)


def test_parity_with_trl_label_smoothed_sigmoid():
    """TRL 1.16 dropped label smoothing from DPO's sigmoid loss but keeps the conservative form in CPO's,
    which on log-ratios (instead of log-probs) is cDPO."""
    p, _, _ = random_pairs(seed=2)
    want = trl_cpo_loss("sigmoid", 0.2, 0.15, 0.0, p.chosen_logratio(), p.rejected_logratio())
    assert torch.allclose(conservative_dpo(p, 0.2, 0.15), want, atol=1e-6)


# ---- the method, end to end on the quick policy -------------------------------------------------------------

TINY = ["model=sft-policy-quick", "difficulties=2", "pair_prompts=24", "samples_per_prompt=6", "steps=6",
        "batch_size=8", "warmup_steps=1", "log_every=1", "eval_problems=30", "kl_problems=8", "eval_every=3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    return out, dpo.run(load_config(dpo.DPOConfig, None, TINY + [f"output_dir={out}"]))


def test_dpo_run_separates_chosen_from_rejected(tiny_run):
    """On its own verifier-labelled pairs the policy's implicit reward margin opens up during training."""
    out, summary = tiny_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["rewards/margins"] > lines[0]["rewards/margins"]
    assert summary["metrics"]["rewards/accuracies"] > 0.5
    assert summary["metrics"]["pairs"] > 0


def test_dpo_output_contract(tiny_run):
    out, summary = tiny_run
    assert summary["method"] == "dpo"
    assert {"accuracy", "kl", "frontier"} <= set(summary["metrics"]) and "accuracy" in summary["baseline"]
    frontier = summary["metrics"]["frontier"]
    assert [p["step"] for p in frontier] == [0, 3, 6] and frontier[0]["kl"] == 0.0
    assert summary["metrics"]["kl"] >= 0
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert name in line
    for name in ("training_curve.png", "reward_kl_frontier.png", "samples.jsonl", "model/config.json"):
        assert (out / name).stat().st_size > 0


def test_dpo_on_user_pairs_with_a_beta_sweep(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q: {a}+{b}\n", "chosen": f"A: {a + b}", "rejected": f"A: {a + b + 1}"}
            for a in range(10, 14) for b in range(20, 23)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(dpo.DPOConfig, None, ["model=sft-policy-quick", f"data={data}", "steps=4", "batch_size=4",
                                            "warmup_steps=1", "eval_every=0", "beta_sweep=0.5",
                                            f"output_dir={tmp_path / 'run'}"])
    summary = dpo.run(cfg)
    assert summary["metrics"]["n"] == 1 and summary["metrics"]["pairs"] == 11
    assert [p["beta"] for p in summary["metrics"]["beta_sweep"]] == [0.1, 0.5]
    assert (tmp_path / "run" / "beta_sweep.png").stat().st_size > 0


def test_bad_preference_data_names_the_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Q: 1+1\\n", "chosen": "A: 2", "rejected": "A: 3"}\n{"prompt": "Q: 1+2\\n", "chosen": "A: 3"}\n')
    cfg = load_config(dpo.DPOConfig, None, [f"data={data}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"pairs.jsonl:2"):
        dpo.run(cfg)


def test_unknown_loss_is_refused():
    with pytest.raises(UserError, match="sigmoid, cdpo, ipo, simpo"):
        load_config(dpo.DPOConfig, None, ["loss=kto"])


@pytest.mark.slow
def test_default_dpo_gains_ten_points_over_the_shared_policy(tmp_path):
    """From the shared policy (it learned the sloppy demonstrator's forgotten carry), DPO on its own
    verifier-labelled pairs gains >= 10 points of held-out accuracy."""
    summary = dpo.run(load_config(dpo.DPOConfig, None, [f"output_dir={tmp_path}"]))
    assert summary["metrics"]["accuracy"] >= summary["baseline"]["accuracy"] + 0.10
    assert 0 < summary["metrics"]["kl"] < 10


def test_dpo_with_lora_and_the_adapters_off_as_reference(tmp_path):
    """lora_r with the reference not precomputed: the reference is the policy with its adapters off, so the
    implicit rewards start at exactly 0 (B = 0) and move once the adapters train; only adapters train."""
    summary = dpo.run(load_config(dpo.DPOConfig, None, TINY + ["lora_r=4", "lr=5e-4", "precompute_ref_logps=false",
                                                               "eval_every=0", f"output_dir={tmp_path}"]))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["rewards/chosen"] == 0.0 and lines[0]["rewards/rejected"] == 0.0
    assert lines[-1]["rewards/margins"] > 0
    assert summary["params"]["trainable"] < 0.1 * summary["params"]["total"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and (tmp_path / "model" / "config.json").exists()
