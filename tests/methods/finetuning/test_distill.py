"""Distillation: the KL losses against values worked out by hand, and runs of `posttrain distill`."""
import json
import math

import pytest
import torch

from posttrain.config import load_config
from posttrain.data import EncodedDataset, encode_pair, encode_prompt
from posttrain.errors import UserError
from posttrain.losses.distill import forward_kl, reverse_kl
from posttrain.methods.common import world_examples
from posttrain.methods.finetuning import distill
from posttrain.world import MAIN_SKILL
from tests.conftest import random_model

QUICK = [f"{k}={v}" for k, v in distill.QUICK.items()]


def one_position(teacher_row, student_row):
    """Logits (1, V) of one labelled position for each model."""
    return torch.tensor([student_row], requires_grad=True), torch.tensor([teacher_row])


def test_forward_kl_by_hand():
    """Teacher logits (0, ln 3) give p = (1/4, 3/4); student logits (0, 0) give q = (1/2, 1/2).
    KL(p || q) = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = -1/4 ln 2 + 3/4 ln 1.5 = 0.1308121."""
    student, teacher = one_position([0.0, math.log(3)], [0.0, 0.0])
    loss, metrics = forward_kl(student, teacher)
    assert loss.item() == pytest.approx(-0.25 * math.log(2) + 0.75 * math.log(1.5), abs=1e-6)
    assert loss.item() == pytest.approx(0.1308121, abs=1e-6) and metrics["tokens"] == 1
    # d KL / d z_student = q - p = (1/2 - 1/4, 1/2 - 3/4) at tau = 1
    loss.backward()
    torch.testing.assert_close(student.grad[0], torch.tensor([0.25, -0.25]))


def test_reverse_kl_by_hand():
    """KL(q || p) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3) = 0.1438410."""
    student, teacher = one_position([0.0, math.log(3)], [0.0, 0.0])
    loss, _ = reverse_kl(student, teacher)
    assert loss.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


def test_temperature_softens_the_targets_and_scales_by_tau_squared():
    """At tau = 2 the teacher's logits become (0, ln 3 / 2): p = (1, sqrt 3) / (1 + sqrt 3); q stays uniform.
    tau^2 KL = 4 (p1 ln 2 p1 + p2 ln 2 p2) = 0.1453631."""
    p1, p2 = 1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    student, teacher = one_position([0.0, math.log(3)], [0.0, 0.0])
    loss, metrics = forward_kl(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(4 * (p1 * math.log(2 * p1) + p2 * math.log(2 * p2)), abs=1e-6)
    assert loss.item() == pytest.approx(0.1453631, abs=1e-6) and metrics["kl"] == pytest.approx(loss.item() / 4)


def test_kl_is_zero_for_identical_models_and_averages_the_positions():
    torch.manual_seed(0)
    logits = torch.randn(6, 7)
    assert forward_kl(logits, logits)[0].item() == pytest.approx(0.0, abs=1e-6)
    shifted = logits.clone()
    shifted[1] += torch.arange(7.0)  # change only position 1
    loss, metrics = forward_kl(shifted, logits)
    single, _ = forward_kl(shifted[1:2], logits[1:2])
    assert metrics["tokens"] == 6 and loss.item() == pytest.approx(single.item() / 6, rel=1e-5)


def test_soft_kd_loss_reads_only_the_logits_that_score_a_label(tokenizer):
    """The loss a soft-KD step trains on equals the divergence over every position's logits, masked by hand."""
    rows = [encode_pair(tokenizer, "Q: 12+34\n" * n, f"A: {46 * n}") for n in (2, 4)]
    batch = EncodedDataset(rows, tokenizer.pad_token_id, 2, seed=0).batch(0)
    teacher, student = random_model(tokenizer, seed=0, hidden=64), random_model(tokenizer, seed=1)
    cfg = load_config(distill.DistillConfig, None, ["temperature=2"])
    loss, metrics = distill.soft_kd_loss(teacher, cfg, "forward_kl")(student, batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labelled = batch["labels"][:, 1:] != -100  # (B, T-1): position t scores labels[:, t + 1]
    full, _ = forward_kl(student(**inputs).logits[:, :-1][labelled], teacher(**inputs).logits[:, :-1][labelled], 2.0)
    assert loss.item() == pytest.approx(full.item(), abs=1e-6)
    assert metrics["tokens"] == int((batch["labels"] != -100).sum())


def test_on_policy_batches_put_the_students_own_samples_first_and_keep_the_rest(tokenizer):
    """Half of a step's rows are the student's completions of their prompts, sampled with the step's seed
    (the same batch when the step is replayed) and labelled on the completion only; the rest are the data's rows."""
    pairs = [(f"Q: {a}+{a}\n", f"A: {2 * a}") for a in range(10, 18)]
    data = EncodedDataset([encode_pair(tokenizer, *p) for p in pairs], tokenizer.pad_token_id, 4, seed=3)
    student = random_model(tokenizer, seed=2)
    batch_fn = distill.on_policy_batches(student, tokenizer, [p for p, _ in pairs], data, 0.5, max_new_tokens=6, seed=5)
    batch, picks = batch_fn(1), data.picks(1)
    for i in (0, 1):  # sampled: prompt unlabelled, then the sampled tokens labelled
        prompt = encode_prompt(tokenizer, pairs[picks[i]][0])
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        n = int(batch["attention_mask"][i].sum())
        assert ids[: len(prompt)].tolist() == prompt and (labels[: len(prompt)] == -100).all()
        assert labels[len(prompt) : n].tolist() == ids[len(prompt) : n].tolist() and 1 <= n - len(prompt) <= 6
    for i in (2, 3):  # kept: the data's own rows
        ids, labels = data.rows[picks[i]]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids and batch["labels"][i, : len(ids)].tolist() == labels
    assert all(torch.equal(batch[k], batch_fn(1)[k]) for k in batch)


def test_on_policy_batches_sample_several_steps_rows_in_one_pass(tokenizer, monkeypatch):
    """With sample_every=3 the student samples the own rows of steps 0-2 in one pass, at step 0, and those
    of steps 3-5 in the next, at step 3; each step gets the completions of its own picks' prompts."""
    pairs = [(f"Q: {a}+{a}\n", f"A: {2 * a}") for a in range(10, 22)]
    data = EncodedDataset([encode_pair(tokenizer, *p) for p in pairs], tokenizer.pad_token_id, 4, seed=3)
    passes = []
    sample = distill.sample_rollouts
    monkeypatch.setattr(distill, "sample_rollouts", lambda model, tok, prompts, **kw: passes.append(prompts) or
                        sample(model, tok, prompts, **kw))
    batch_fn = distill.on_policy_batches(random_model(tokenizer, seed=2), tokenizer, [p for p, _ in pairs], data,
                                         0.5, max_new_tokens=6, seed=5, sample_every=3)
    batches = [batch_fn(step) for step in range(4)]
    own_prompts = [[pairs[i][0] for i in data.picks(step)[:2]] for step in range(6)]
    assert passes == [sum(own_prompts[:3], []), sum(own_prompts[3:], [])]
    for step, batch in enumerate(batches):
        for i in (0, 1):
            prompt = encode_prompt(tokenizer, own_prompts[step][i])
            assert batch["input_ids"][i, : len(prompt)].tolist() == prompt


def test_a_student_with_another_vocabulary_is_refused(quick_model, tiny_model_dir):
    with pytest.raises(UserError, match="different vocabularies"):
        distill.load_pair(quick_model, str(tiny_model_dir))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    return out, distill.run(load_config(distill.DistillConfig, None, QUICK + [f"output_dir={out}"]))


def test_quick_distill_reports_teacher_and_four_students_that_learned(quick_run):
    out, summary = quick_run
    metrics = summary["metrics"]
    assert set(metrics["students"]) == {"sft", "seq_kd", "soft_kd", "on_policy"}
    assert metrics["student_to_teacher_params"] <= 0.25
    assert metrics["teacher"]["accuracy"] >= 0.8
    for kind, student in metrics["students"].items():
        assert student["accuracy"] >= summary["baseline"]["accuracy"] + 0.1, kind
    assert metrics["accuracy"] == metrics["students"]["on_policy"]["accuracy"]
    assert metrics["gap_closed"] == metrics["gap_closed_by_student"]["on_policy"]
    kl = [json.loads(line)["loss"] for line in (out / "soft_kd" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert kl[-1] < 0.5 * kl[0]
    assert (out / "students.png").stat().st_size > 0 and (out / "summary.json").exists()


def test_distill_on_records_trains_every_student_on_them_and_scores_exact_matches(tmp_path):
    """A wiring test (the learning bars are the world runs'): 2-digit CoT additions written as records. The
    quick teacher writes every held-out completion exactly (1.00), the student base none (0.00); sequence-level
    KD trains on the teacher's completions of the 90 training prompts, which equal the references here
    but for a slip or two (the quick teacher is not perfect on every prompt)."""
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in world_examples(MAIN_SKILL, [2], 100, "cot", 1)))
    out = tmp_path / "run"
    summary = distill.run(load_config(distill.DistillConfig, None, QUICK + [f"output_dir={out}", f"data={data}",
                                                                            "steps=12", "warmup_steps=2"]))
    metrics = summary["metrics"]
    assert summary["baseline"]["accuracy"] == 0.0 and summary["baseline"]["n"] == 10
    assert "_main" not in summary["baseline"] and summary["baseline"]["heldout_nll"] > 0  # no completions in it
    assert metrics["teacher"]["accuracy"] == 1.0
    assert metrics["train_prompts"] == 90 and metrics["seq_kd_data"]["identical_to_reference"] >= 0.95
    assert set(metrics["students"]) == {"sft", "seq_kd", "soft_kd", "on_policy"}
    assert all("step_accuracy" not in student for student in metrics["students"].values())  # no step checker here
    for kind in metrics["students"]:
        losses = [json.loads(line)["loss"] for line in (out / kind / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert losses[-1] < losses[0], kind


def test_distill_reads_its_records_before_loading_a_model(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Q: 1+1\\n"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: missing field .completion."):
        distill.run(load_config(distill.DistillConfig, None, [f"output_dir={tmp_path / 'run'}", f"data={data}",
                                                               "teacher=/nonexistent"]))


@pytest.mark.slow
def test_default_distillation(tmp_path):
    """The bar: a student of <= 1/4 of the teacher's parameters, every student reported, and the
    distilled (on-policy) student closing >= 30% of the SFT student's gap to the teacher."""
    summary = distill.run(load_config(distill.DistillConfig, None, [f"output_dir={tmp_path}"]))
    metrics = summary["metrics"]
    assert metrics["student_to_teacher_params"] <= 0.25
    students = metrics["students"]
    assert metrics["teacher"]["accuracy"] > students["sft"]["accuracy"] > summary["baseline"]["accuracy"] + 0.3
    assert metrics["gap_closed"] >= 0.3
