"""Reward modelling: losses against hand-derived values, the scalar head's read-out under padding,
the on-disk format, the evaluation helpers, and a quick end-to-end run that has to learn."""
import json
import math

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.evaluation import auc, best_of_n, calibration, overoptimisation_point
from posttrain.losses.reward import bradley_terry_loss, min_score, outcome_bce_loss, prm_step_loss, product_score
from posttrain.methods.rl import reward_model
from posttrain.reward_models import LikelihoodRewardModel, ValueHeadRewardModel, collate, encode, last_token_index, load_reward_model, step_end_chars
from posttrain.world import completion_steps, render, sample_problems
from tests.conftest import random_model


def test_bradley_terry_loss_equals_hand_value():
    """margins 2 and -1: loss = (log(1 + e^-2) + log(1 + e^1)) / 2 = (0.126928 + 1.313262) / 2 = 0.720095."""
    loss, metrics = bradley_terry_loss(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(0.720095, abs=1e-6)
    assert metrics["pair_accuracy"] == 0.5 and metrics["margin"] == pytest.approx(0.5)


def test_outcome_bce_equals_hand_value():
    """rewards 0 and ln 3, labels 1 and 0: (-log 1/2 - log(1 - 3/4)) / 2 = (0.693147 + 1.386294) / 2."""
    loss, _ = outcome_bce_loss(torch.tensor([0.0, math.log(3)]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(1.039721, abs=1e-6)


def test_prm_loss_averages_only_real_steps():
    """Row 1: steps with logits 0 (label 1) and ln 3 (label 0); row 2: logit -ln 3 (label 0) and padding.
    Per-step BCE: log 2 = 0.693147, -log(1/4) = 1.386294, -log(3/4) = 0.287682; mean of the three
    real steps = 0.789041. Predictions > 0 count as 'right': 0 -> wrong(=0 vs 1), ln3 -> 1 vs 0 wrong,
    -ln3 -> 0 vs 0 right: step accuracy 1/3."""
    logits = torch.tensor([[0.0, math.log(3)], [-math.log(3), 50.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = prm_step_loss(logits, labels, mask)
    assert loss.item() == pytest.approx(0.789041, abs=1e-6)
    assert metrics["step_accuracy"] == pytest.approx(1 / 3)


def test_prm_aggregates_ignore_padding():
    probs, mask = torch.tensor([[0.9, 0.5, 0.0], [0.8, 0.1, 0.2]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert min_score(probs, mask).tolist() == pytest.approx([0.5, 0.1])
    assert product_score(probs, mask).tolist() == pytest.approx([0.45, 0.016])


def left_padded(short, long, pad_id: int) -> dict:
    pad = len(long.ids) - len(short.ids)
    completion = lambda r, p: [0] * (p + r.prompt_len) + [1] * (len(r.ids) - r.prompt_len)  # noqa: E731
    return {"input_ids": torch.tensor([[pad_id] * pad + short.ids, long.ids]),
            "attention_mask": torch.tensor([[0] * pad + [1] * len(short.ids), [1] * len(long.ids)]),
            "completion_mask": torch.tensor([completion(short, pad), completion(long, 0)])}


@pytest.mark.parametrize("head", [ValueHeadRewardModel, LikelihoodRewardModel])
def test_scalar_head_reads_the_last_real_token_under_left_and_right_padding(tokenizer, head):
    model = random_model(tokenizer)
    rm = head(model.model if head is ValueHeadRewardModel else model, tokenizer, "orm").eval()
    short, long = encode(tokenizer, "Q: 1+2\n", "A: 3"), encode(tokenizer, "Q: 12+34\n", "A: 46")
    right = collate([short, long], tokenizer.pad_token_id)
    left = left_padded(short, long, tokenizer.pad_token_id)
    assert last_token_index(right["attention_mask"]).tolist() == [len(short.ids) - 1, len(long.ids) - 1]
    assert last_token_index(left["attention_mask"]).tolist() == [len(long.ids) - 1] * 2
    with torch.no_grad():
        alone = rm.rewards(collate([short], tokenizer.pad_token_id))
        assert torch.allclose(rm.rewards(right), rm.rewards(left), atol=1e-5)
        assert torch.allclose(rm.rewards(right)[0], alone[0], atol=1e-5)
        # and it is the value at that token, not at the padding after it
        values = rm(right)
        assert rm.rewards(right)[0] == values[0, len(short.ids) - 1]


def test_step_positions_are_the_newlines_ending_each_step(tokenizer):
    problem = sample_problems("add", 3, 1, "test", 0)[0]
    prompt, completion = render(problem, "cot")
    encoded = encode(tokenizer, prompt, completion)
    *steps, final = encoded.steps
    assert len(steps) == len(completion_steps(completion)) == len(problem.steps)
    assert all(tokenizer.decode([encoded.ids[i]]) == "\n" for i in steps)
    assert final == len(encoded.ids) - 1 and encoded.ids[final] == tokenizer.eos_token_id
    # a truncated completion: its last step has no newline and ends at its own last character
    assert step_end_chars("Let's think step by step.\n1+2+0=3") == [len("Let's think step by step.\n1+2+0=3") - 1]
    partial = encode(tokenizer, prompt, completion.rsplit("\n", 1)[0] + "\n", final=False)
    assert len(partial.steps) == len(problem.steps)


def test_saved_reward_model_loads_and_scores_the_same(tokenizer, tmp_path):
    torch.manual_seed(0)
    rm = LikelihoodRewardModel(random_model(tokenizer), tokenizer, "prm", aggregate="product").eval()
    prompts, completions = ["Q: 12+34\n"] * 2, ["Let's think step by step.\n2+4+0=6, digits 6, carry 0\nA: 46", "A: 47"]
    rm.save(tmp_path / "prm")
    loaded = load_reward_model(tmp_path / "prm")
    assert loaded.kind == "prm" and loaded.aggregate == "product" and isinstance(loaded, LikelihoodRewardModel)
    assert loaded.score(prompts, completions) == pytest.approx(rm.score(prompts, completions), abs=1e-6)
    assert [len(s) for s in loaded.step_scores(prompts, completions)] == [1, 0]
    with pytest.raises(UserError, match="not a reward model folder"):
        load_reward_model(tmp_path)


def test_repeated_solutions_are_scored_once_with_the_same_score(tokenizer):
    torch.manual_seed(0)
    rm = LikelihoodRewardModel(random_model(tokenizer), tokenizer, "orm").eval()
    prompts, completions = ["Q: 12+34\n"] * 4, ["A: 46", "A: 47", "A: 46", "A: 46"]
    rows_seen = []
    rm.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0]["input_ids"].shape[0]))
    scores = rm.score(prompts, completions)
    assert rows_seen == [2]  # the two distinct texts, once each
    assert scores[0] == scores[2] == scores[3] != scores[1]
    assert scores == pytest.approx([rm.score(prompts[:1], [c])[0] for c in completions], abs=1e-6)


def test_first_of_each_keeps_each_problems_first_samples():
    s = lambda problem, text: reward_model.Solution(problem, "Q", text, True, [])  # noqa: E731
    pool = [s(0, "a"), s(0, "b"), s(0, "c"), s(1, "d"), s(1, "e"), s(1, "f")]
    assert [x.completion for x in reward_model.first_of_each(pool, 2)] == ["a", "b", "d", "e"]
    with pytest.raises(UserError, match="hacking_samples"):
        load_config(reward_model.CONFIG, None, ["test_samples=16", "hacking_samples=8"])


def test_best_of_n_expectation_equals_enumeration():
    """k=4 samples scored [0.9, 0.1, 0.5, 0.7], correct [0, 1, 1, 0]. Best of 2 over the 6 pairs:
    {a,b}->a 0, {a,c}->a 0, {a,d}->a 0, {b,c}->c 1, {b,d}->d 0, {c,d}->d 0: 1/6."""
    scores, right = [0.9, 0.1, 0.5, 0.7], [0.0, 1.0, 1.0, 0.0]
    assert best_of_n(scores, right, 2) == pytest.approx(1 / 6)
    assert best_of_n(scores, right, 1) == pytest.approx(0.5)  # a random sample
    assert best_of_n(scores, right, 4) == 0.0  # always the top-scored one
    with pytest.raises(ValueError):
        best_of_n(scores, right, 5)


def test_auc_calibration_and_overoptimisation_detector():
    assert auc([0.9, 0.8, 0.3, 0.8], [1, 1, 0, 0]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert auc([0.1], [1]) is None
    table = calibration([0.05, 0.15, 0.95, 0.95], [0, 1, 1, 0], bins=10)
    # bins: [0,0.1) conf .05 acc 0; [0.1,0.2) conf .15 acc 1; [0.9,1] conf .95 acc .5
    assert table["ece"] == pytest.approx((0.05 + 0.85 + 2 * 0.45) / 4)
    ns = [1, 2, 4, 8, 16]
    assert overoptimisation_point(ns, [0, 1, 2, 3, 4], [0.4, 0.5, 0.48, 0.40, 0.3], tolerance=0.05) == 8
    assert overoptimisation_point(ns, [0, 1, 2, 3, 4], [0.4, 0.5, 0.52, 0.51, 0.5], tolerance=0.05) is None
    assert overoptimisation_point(ns, [4, 3, 2, 1, 0], [0.5, 0.4, 0.3, 0.2, 0.1], tolerance=0.05) is None  # proxy fell too


def test_pair_builders_use_distinct_texts():
    s = lambda text, ok: reward_model.Solution(0, "Q", text, ok, [])  # noqa: E731
    group = [s("right", True), s("right", True), s("wrong", False), s("longer wrong", False)]
    assert [(c.completion, w.completion) for c, w in reward_model.correctness_pairs(group)] == [
        ("right", "wrong"), ("right", "longer wrong")]
    # the length-biased rater prefers the longer text even when it is wrong; correctness breaks ties
    biased = {(a.completion, b.completion) for a, b in reward_model.length_biased_pairs(group)}
    assert biased == {("longer wrong", "right"), ("longer wrong", "wrong"), ("right", "wrong")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    overrides = [f"{k}={v}" for k, v in reward_model.QUICK.items()] + [f"output_dir={out}"]
    return out, reward_model.run(load_config(reward_model.CONFIG, None, overrides))


def test_quick_run_learns_and_keeps_the_output_contract(quick_run):
    out, summary = quick_run
    metrics = summary["metrics"]
    for key in ("orm_pair_accuracy", "orm_auc", "prm_step_accuracy", "prm_first_error_accuracy", "hacking"):
        assert key in metrics
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("orm", "proxy"):  # Bradley-Terry on training pairs: the loss falls within 20 steps
        losses = [json.loads(line)["loss"] for line in (out / "training" / name / "metrics.jsonl").read_text().splitlines()]
        assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), name  # one line per step
    for name in ("orm", "prm", "proxy"):
        assert load_reward_model(out / name).kind == ("prm" if name == "prm" else "orm")
    for name in ("reward_distributions.png", "prm_reliability.png", "reward_hacking.png"):
        assert (out / name).stat().st_size > 0
    curve = metrics["hacking"]["proxy"]["curve"]
    assert [c["n"] for c in curve] == [1, 2, 4, 8]
    assert curve[-1]["reward"] > curve[0]["reward"]  # best-of-N always raises the reward it optimises


def test_user_preference_data_trains_an_orm(tmp_path, quick_model):
    records = [{"prompt": f"Q: {a}+{a}\n", "chosen": f"A: {2 * a}", "rejected": f"A: {2 * a + 1}"} for a in range(40)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = load_config(reward_model.CONFIG, None, [f"data={data}", f"model={quick_model}", f"output_dir={tmp_path / 'out'}",
                                                   "steps=5", "batch_size=4"])
    summary = reward_model.run(cfg)
    assert summary["metrics"]["held_out_pairs"] == 4 and summary["metrics"]["train_pairs"] == 36
    assert load_reward_model(tmp_path / "out" / "orm").kind == "orm"


def test_bad_preference_data_names_the_line(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "Q", "chosen": "A: 1"}\n')
    cfg = load_config(reward_model.CONFIG, None, [f"data={data}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(UserError, match="prefs.jsonl:1"):
        reward_model.run(cfg)


@pytest.mark.slow
def test_default_reward_run(tmp_path):
    """The default run on the shared 4-digit policy: ORM pair and PRM step accuracy >= 0.85, and the
    hacking curve: the length-biased proxy's best-of-N accuracy falls past its peak and the detector
    fires; the clean ORM's leaves it silent."""
    summary = reward_model.run(load_config(reward_model.CONFIG, None, [f"output_dir={tmp_path}"]))
    metrics = summary["metrics"]
    assert metrics["test_solutions"] == 64 * 16
    assert metrics["orm_pair_accuracy"] >= 0.85 and metrics["prm_step_accuracy"] >= 0.85
    # most steps are right (always saying "right" scores high), so also: better than that, and the first
    # wrong step found
    assert metrics["prm_step_accuracy"] > metrics["prm_step_label_mean"] + 0.05
    assert metrics["prm_first_error_accuracy"] >= 0.8
    proxy, clean = metrics["hacking"]["proxy"], metrics["hacking"]["orm"]
    assert proxy["curve"][-1]["n"] == 128 and proxy["detected_at_n"] is not None and clean["detected_at_n"] is None
    accuracy = [c["accuracy"] for c in proxy["curve"]]
    assert max(accuracy) >= accuracy[0] + 0.05 and accuracy[-1] <= max(accuracy) - 0.05  # up, then down


def test_freezing_lower_layers_leaves_the_top_block_norm_and_head(tokenizer):
    rm = ValueHeadRewardModel(random_model(tokenizer, layers=2).model, tokenizer, "orm")
    reward_model.freeze_lower_layers(rm, 1)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.layers.1.", "backbone.norm.", "head.")) for n in trainable)
    assert "head.weight" in trainable and "backbone.norm.weight" in trainable


def test_likelihood_head_is_the_scaled_sum_of_completion_log_probs(tokenizer):
    """v at the last token = bias + beta * sum over completion tokens of (log pi(token) - log_ref),
    checked against log-probs computed directly from the language model's logits."""
    torch.manual_seed(0)
    model = random_model(tokenizer).eval()
    rm = LikelihoodRewardModel(model, tokenizer, "orm").eval()
    with torch.no_grad():
        rm.head.raw.copy_(torch.tensor([0.5, -2.0, 0.25]) / rm.head.SCALE)  # beta, log_ref, bias
        row = encode(tokenizer, "Q: 12+34\n", "A: 46")
        logits = model(input_ids=torch.tensor([row.ids])).logits[0]
        logp = torch.log_softmax(logits, -1)
        completion = [logp[t - 1, row.ids[t]].item() for t in range(row.prompt_len, len(row.ids))]
        want = 0.25 + 0.5 * sum(lp + 2.0 for lp in completion)
        assert rm.rewards(collate([row], tokenizer.pad_token_id)).item() == pytest.approx(want, abs=1e-4)
