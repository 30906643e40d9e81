"""The policy-gradient family side by side: the named variants of GRPO carry their papers' settings, DAPO's
dynamic sampling keeps only groups with reward spread and counts what it drew, every on-policy run counts its
samples, and the report draws the family's accuracy against samples drawn."""
import json

import pytest

from posttrain import demo
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.methods import ANSWER_RECORDS, METHODS
from posttrain.methods.rl import dapo, grpo, gspo, reinforce_pp, rloo
from posttrain.models import load_model
from posttrain.report import rl_plots
from posttrain.rollouts import step_rollouts
from posttrain.training import make_accelerator

# Each variant's settings that differ from GRPO's, by hand from its paper and TRL 1.16 (module docstrings).
PUBLISHED = {
    "rloo": (rloo, {"advantage_estimator": "rloo", "beta": 0.05, "output_dir": "runs/rloo"}),
    "reinforce-pp": (reinforce_pp, {"advantage_estimator": "reinforce++", "output_dir": "runs/reinforce-pp"}),
    "dapo": (dapo, {"loss_type": "dapo", "epsilon_high": 0.28, "beta": 0.0, "dynamic_sampling": True,
                    "overlong_buffer": 8, "equal_samples": True, "output_dir": "runs/dapo"}),
    "gspo": (gspo, {"importance_sampling_level": "sequence", "loss_type": "grpo", "clip_eps": 3e-4,
                    "epsilon_high": 4e-4, "beta": 0.0, "output_dir": "runs/gspo"}),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_each_named_method_is_grpo_with_its_published_settings(name):
    module, settings = PUBLISHED[name]
    cfg, base = module.CONFIG(), grpo.GRPOConfig()
    assert cfg.METHOD == name and isinstance(cfg, grpo.GRPOConfig) and module.run is grpo.run
    changed = {k: v for k, v in vars(cfg).items() if vars(base)[k] != v}
    assert changed == settings
    assert (module.QUICK, module.PRESETS) == (grpo.QUICK, grpo.PRESETS)  # GRPO's budget: equal samples
    method = METHODS[name]
    assert (method.category, method.data, method.module) == ("rl", ANSWER_RECORDS, module.__name__)
    assert name in demo.EXPECTED_SECONDS


def test_max_refills_below_zero_is_refused_with_the_key():
    with pytest.raises(UserError, match="max_refills must be >= 0"):
        load_config(dapo.DAPOConfig, None, ["max_refills=-1"])


# ---- dynamic sampling ------------------------------------------------------------------------------------------

G = 2  # completions per prompt
P = 4  # prompts per step


def spread_reward(prompts, completions, answers):
    """1, 0, 1, 0, ... down a group of a "mixed" prompt (its rewards differ), all 1 for a "flat" one."""
    return [float(i % 2 == 0) if answer == "mixed" else 1.0 for i, answer in enumerate(answers)]


def pool(kinds: str) -> tuple[list[str], list[str]]:
    """Prompts and answers, one per letter of `kinds`: m a "mixed" prompt, f a "flat" one."""
    return [f"Q: {i}+{i}\n" for i in range(len(kinds))], ["mixed" if k == "m" else "flat" for k in kinds]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir):
    """step_rollouts on the tiny random model over a pool of 2 steps x 3 windows (the step and 2 refills)."""
    model, tokenizer = load_model(str(tiny_model_dir))
    # windows of P: step 0 | step 1 | refill 1 of step 0 | of step 1 | refill 2 of step 0 | of step 1
    prompts, answers = pool("mfff" "mmff" "fmff" "fmfm" "ffmf" "mmmm")

    def sample(step: int, refills: int):
        return step_rollouts(model, tokenizer, prompts, answers, step, P, num_samples=G, max_new_tokens=4,
                             temperature=1.0, seed=0, reward_fn=spread_reward, accelerator=make_accelerator("fp32"),
                             refills=refills, steps=2)
    return sample, prompts


def test_dynamic_sampling_refills_with_fresh_prompts_until_the_groups_are_informative(sampler):
    """Step 1 draws its window (2 informative groups of 4) and its first refill, the window of virtual step
    1 + 2 = 3 (2 more): it stops there, having dropped the 4 flat groups of the 8 it drew."""
    sample, prompts = sampler
    rollouts = sample(1, refills=2)
    assert rollouts.prompts == [prompts[i] for i in (4, 4, 5, 5, 13, 13, 15, 15)]
    assert rollouts.rewards.view(-1, G).tolist() == [[1.0, 0.0]] * P  # every group has reward spread
    assert (rollouts.samples_drawn, rollouts.groups_dropped) == (2 * P * G, 4)
    # each kept row is the one the refill's own batch sampled: virtual step 3's seed and prompt window
    alone = sample(3, refills=0)
    assert rollouts.row(4) == alone.row(2) and rollouts.texts[4:] == alone.texts[2:4] + alone.texts[6:8]


def test_spent_refills_fill_the_batch_with_dropped_groups_in_the_order_drawn(sampler):
    """Step 0 finds one informative group in each of its 3 batches (its own and 2 refills): the 4th slot takes
    the first flat group drawn, and 12 - 4 = 8 groups are left out."""
    sample, prompts = sampler
    rollouts = sample(0, refills=2)
    assert rollouts.prompts[::G] == [prompts[i] for i in (0, 9, 18, 1)]
    assert rollouts.rewards.view(-1, G).tolist() == [[1.0, 0.0]] * 3 + [[1.0, 1.0]]
    assert (rollouts.samples_drawn, rollouts.groups_dropped) == (3 * P * G, 8)
    assert rollouts.batch["input_ids"].shape[0] == len(rollouts.texts) == len(rollouts.stopped) == P * G


def test_without_dynamic_sampling_a_step_is_its_own_window_as_drawn(sampler):
    sample, prompts = sampler
    rollouts = sample(0, refills=0)
    assert rollouts.prompts[::G] == prompts[:P] and (rollouts.samples_drawn, rollouts.groups_dropped) == (P * G, 0)


REWARD = '''
def spread(prompts, completions, answers, **columns):
    return [float(i % 2 == 0) if int(answer) % 3 == 0 else 1.0 for i, answer in enumerate(answers)]
'''


def dapo_run(tmp_path, model_dir, *overrides) -> tuple[list[dict], dict]:
    """`posttrain dapo` on the tiny model, 3 steps of 4 prompts x 2: its logged metrics and its summary."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}\n", "answer": str(a + b)}) + "\n"
                            for a in range(1, 7) for b in range(1, 7)))
    (tmp_path / "reward.py").write_text(REWARD)
    out = tmp_path / "dapo"
    assert main(["dapo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
                 f"reward={tmp_path / 'reward.py'}:spread", "steps=3", "prompts_per_step=4", "num_generations=2",
                 "batch_size=8", "max_new_tokens=6", "eval_every=2", "eval_problems=4", "kl_problems=4",
                 "max_refills=2", *overrides]) == 0
    return ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
            json.loads((out / "summary.json").read_text()))


def test_a_dapo_run_logs_its_drops_and_every_run_counts_its_samples(tmp_path, tiny_model_dir):
    """`posttrain dapo equal_samples=false` on the tiny model: the run is named dapo, each of its 3 steps logs
    the samples it drew and the groups it dropped, and the summary's samples_drawn and frontier points add
    those counts up."""
    logged, summary = dapo_run(tmp_path, tiny_model_dir, "equal_samples=false")
    assert len(logged) == 3
    assert summary["method"] == "dapo" and summary["config"]["dynamic_sampling"] is True
    # 1 to 3 batches of 4 x 2 drawn per step; what was not trained on was dropped: drawn = 2 x (4 + dropped)
    assert all(m["samples_drawn"] in (8, 16, 24) and m["samples_drawn"] == 2 * (4 + m["groups_dropped"])
               for m in logged)
    assert sum(m["groups_dropped"] for m in logged) > 0  # a third of the answers are "mixed": flat groups occur
    assert summary["metrics"]["samples_drawn"] == sum(m["samples_drawn"] for m in logged)
    frontier = summary["metrics"]["frontier"]
    assert [p["step"] for p in frontier] == [0, 2, 3]
    assert [p["samples"] for p in frontier] == [0, logged[0]["samples_drawn"] + logged[1]["samples_drawn"],
                                                summary["metrics"]["samples_drawn"]]



def test_dapo_stops_at_grpos_sample_count(tmp_path, tiny_model_dir):
    """With equal_samples (DAPO's default) the run stops before the batch that would start past GRPO's count,
    3 steps x 4 prompts x 2 = 24 completions: the batches it ran drew 24 or more, those before the last fewer."""
    logged, summary = dapo_run(tmp_path, tiny_model_dir)
    drawn = [m["samples_drawn"] for m in logged]
    assert sum(drawn[:-1]) < 24 <= sum(drawn) == summary["metrics"]["samples_drawn"]
    assert len(logged) < 3  # the refills spent the budget before the third batch
    assert summary["metrics"]["rollout_batches"] == len(logged) == summary["metrics"]["frontier"][-1]["step"]
    assert summary["metrics"]["completions_sampled"] == len(logged) * 4 * 2  # trained on

# ---- the report's family plot ----------------------------------------------------------------------------------


def fake_run(run_dir, name: str, frontier: list[dict], category: str = "rl") -> None:
    (run_dir / name).mkdir(parents=True)
    summary = {"method": name, "category": category, "metrics": {"accuracy": frontier[-1]["accuracy"] if frontier
                                                                  else 0.5, "frontier": frontier},
               "baseline": {"accuracy": 0.4}, "params": {"trainable": 10, "total": 10}, "time_s": 1.0}
    (run_dir / name / "summary.json").write_text(json.dumps(summary))


def points(*triples) -> list[dict]:
    return [{"step": step, "accuracy": accuracy, "kl": 0.0, "samples": samples} for step, samples, accuracy in triples]


def test_the_report_draws_the_familys_accuracy_against_samples_drawn(tmp_path, monkeypatch):
    """grpo, dapo and ppo runs with counted samples become the plot's three series (in the family's order, each
    point at its samples drawn); dpo (not of the family) and sft stay out. The plot is embedded in report.html."""
    fake_run(tmp_path, "sft", [], category="fine-tuning")
    fake_run(tmp_path, "dpo", [{"step": 0, "accuracy": 0.4, "kl": 0.0}, {"step": 5, "accuracy": 0.6, "kl": 0.1}])
    fake_run(tmp_path, "ppo", points((0, 0, 0.4), (2, 64, 0.5)))
    fake_run(tmp_path, "grpo", points((2, 256, 0.6), (0, 0, 0.4), (1, 128, 0.5)))  # in any order
    fake_run(tmp_path, "dapo", points((0, 0, 0.4), (2, 300, 0.7)))
    drawn = {}
    draw = rl_plots.pg_family_plot
    monkeypatch.setattr(rl_plots, "pg_family_plot", lambda curves, path: (drawn.update(curves), draw(curves, path)))
    assert main(["report", str(tmp_path)]) == 0
    assert list(drawn) == ["grpo", "dapo", "ppo"]
    assert drawn["grpo"] == [(0, 0.4), (128, 0.5), (256, 0.6)] and drawn["dapo"] == [(0, 0.4), (300, 0.7)]
    assert (tmp_path / rl_plots.PG_FAMILY_PLOT).read_bytes().startswith(b"\x89PNG")
    page = (tmp_path / "report.html").read_text()
    assert "Policy-gradient family at equal samples" in page and "Reward-KL frontiers" in page
    assert page.count("data:image/png;base64,") == 2  # the family and the frontiers: the fake runs have no plots


def test_one_family_run_draws_no_comparison(tmp_path):
    fake_run(tmp_path, "grpo", points((0, 0, 0.4), (1, 128, 0.5)))
    fake_run(tmp_path, "rloo", [{"step": 0, "accuracy": 0.4, "kl": 0.0}])  # no samples counted: left out
    assert main(["report", str(tmp_path)]) == 0
    assert not (tmp_path / rl_plots.PG_FAMILY_PLOT).exists()
    assert "Policy-gradient family" not in (tmp_path / "report.html").read_text()


# ---- end to end (builds the quick SFT policy once: last) --------------------------------------------------------


def test_quick_rloo_run_writes_its_own_summary(tmp_path):
    out = tmp_path / "rloo"
    assert main(["rloo", "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "rloo" and summary["config"]["advantage_estimator"] == "rloo"
    steps, rows = rloo.QUICK["steps"], summary["config"]["prompts_per_step"] * summary["config"]["num_generations"]
    assert summary["metrics"]["samples_drawn"] == steps * rows == 8 * 16 * 8
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert [p["samples"] for p in summary["metrics"]["frontier"]] == [0, steps * rows]
    assert (out / "training_curve.png").exists() and (out / "reward_kl_frontier.png").exists()
