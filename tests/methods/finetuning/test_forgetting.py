"""Forgetting defences of `posttrain sft`: the L2-SP penalty by hand, variant specs, replay batches,
and the default run's Done-when numbers (slow). The quick run's effect directions are in test_sft.py beside it,
which shares its run with the foundation's SFT tests."""
import pytest
import torch

from posttrain.config import load_config
from posttrain.data import EncodedDataset, encode_pair
from posttrain.errors import UserError
from posttrain.generation import Samples
from posttrain.losses.sft import IGNORE, l2sp_penalty
from posttrain.methods.finetuning import sft
from posttrain.world import render, sample_problems


def test_l2sp_penalty_by_hand():
    """w = [1, 2], b = 0.5 against anchors w0 = [0, 0], b0 = 0.5, strength 0.1:
    penalty = 0.1/2 * ((1-0)^2 + (2-0)^2 + (0.5-0.5)^2) = 0.05 * 5 = 0.25,
    d penalty / d w = 0.1 * (w - w0) = [0.1, 0.2], d penalty / d b = 0."""
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.fill_(0.5)
    anchors = {"weight": torch.zeros(1, 2), "bias": torch.tensor([0.5])}
    penalty = l2sp_penalty(layer, anchors, 0.1)
    penalty.backward()
    assert penalty.item() == pytest.approx(0.25)
    assert layer.weight.grad.flatten().tolist() == pytest.approx([0.1, 0.2])
    assert layer.bias.grad.item() == 0.0


def test_l2sp_penalty_is_zero_at_the_anchor_and_grows_with_the_shift(tokenizer):
    from tests.conftest import random_model

    model = random_model(tokenizer)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert l2sp_penalty(model, anchors, 1.0).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    n = sum(p.numel() for p in model.parameters())
    assert l2sp_penalty(model, anchors, 2.0).item() == pytest.approx(n * 0.01**2, rel=1e-4)  # ||shift||^2


@pytest.mark.parametrize("spec, parsed", [("plain", ("plain", 0.0)), ("l2sp:0.03", ("l2sp", 0.03)),
                                          ("replay:0.4", ("replay", 0.4)), ("rehearse:0.4", ("rehearse", 0.4))])
def test_parse_variant(spec, parsed):
    assert sft.parse_variant(spec) == parsed


@pytest.mark.parametrize("spec", ["plain:1", "l2sp", "l2sp:0", "l2sp:x", "replay:1", "replay:-0.1", "rehearse:0",
                                  "dropout:0.1"])
def test_bad_variants_are_user_errors(spec):
    with pytest.raises(UserError, match="variant"):
        load_config(sft.SFTConfig, None, [f"variants=plain,{spec}"])


@pytest.mark.parametrize("kind", ["replay", "rehearse"])
def test_replay_cannot_lead_a_run_on_user_data(kind):
    with pytest.raises(UserError, match=kind):
        load_config(sft.SFTConfig, None, ["data=x.jsonl", f"variants={kind}:0.3"])


def test_concat_batches_pads_the_narrower_batch():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[IGNORE, 6, 7]]),
         "attention_mask": torch.tensor([[1, 1, 1]])}
    b = {"input_ids": torch.tensor([[8]]), "labels": torch.tensor([[8]]), "attention_mask": torch.tensor([[1]])}
    out = sft.concat_batches(a, b, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_replay_adds_old_skill_rows_to_the_same_target_rows(tokenizer):
    """replay:0.5 with batch 4: every step holds the plain variant's 4 target rows, then 4 old-skill rows."""
    cfg = load_config(sft.SFTConfig, None, ["batch_size=4", "steps=10", "old_skills=sub,sort"])
    pairs = [render(p, "cot") for p in sample_problems("add", 3, 20, "train", 0)]
    target = EncodedDataset([encode_pair(tokenizer, *p) for p in pairs], tokenizer.pad_token_id, 4, 0)
    setup = sft.VariantSetup(cfg, target, None, tokenizer, anchors=None)
    plain, replay = (sft.DEFENCES[kind](setup, value)[0] for kind, value in (("plain", 0.0), ("replay", 0.5)))
    for step in (0, 7):
        mixed, alone = replay(step), plain(step)
        assert mixed["input_ids"].shape[0] == 8
        width = alone["input_ids"].shape[1]
        assert torch.equal(mixed["input_ids"][:4, :width], alone["input_ids"])
        assert (mixed["attention_mask"][:4, width:] == 0).all()
        old = tokenizer.batch_decode(mixed["input_ids"][4:], skip_special_tokens=True)
        assert all("-" in text or "sort" in text for text in old)  # subtraction or sorting problems


def test_rehearsal_rows_are_the_base_models_finished_answers(monkeypatch, tokenizer):
    """rehearse:F trains on (old-skill prompt, the base's own greedy answer) pairs, wrong answers included;
    a row the base did not finish within the budget is dropped rather than taught with a made-up end."""
    cfg = load_config(sft.SFTConfig, None, ["old_skills=sub,sort"])
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens):
        seen["prompts"] = prompts
        n = len(prompts)
        return Samples([f"A: {i}" for i in range(n)], [[] for _ in range(n)], [[] for _ in range(n)],
                       [i % 3 != 2 for i in range(n)])

    monkeypatch.setattr(sft, "generate", fake_generate)
    rows = sft.rehearsal_rows(cfg, 6, base_model=None, tokenizer=tokenizer)
    prompts = seen["prompts"]
    assert len(prompts) == 6 and sum("-" in p for p in prompts) == 3 and sum("sort" in p for p in prompts) == 3
    assert rows == [(prompts[i], f"A: {i}") for i in (0, 1, 3, 4)]


def test_rehearsal_with_no_finished_answer_is_a_user_error(monkeypatch, tokenizer):
    cfg = load_config(sft.SFTConfig, None, ["old_skills=sort"])
    monkeypatch.setattr(sft, "generate", lambda model, tok, prompts, max_new_tokens: Samples(
        ["1 2 3 4 5 6"] * len(prompts), [[]] * len(prompts), [[]] * len(prompts), [False] * len(prompts)))
    with pytest.raises(UserError, match="finished none of its 4 old-skill answers"):
        sft.rehearsal_rows(cfg, 4, base_model=None, tokenizer=tokenizer)


@pytest.mark.slow
def test_default_sft_meets_the_forgetting_bar(tmp_path):
    """Plain SFT forgets >= 5 points of some old skill; the best mitigation keeps
    at most half of that drop (on every skill plain SFT forgot) and loses at most 3 points of target."""
    summary = sft.run(load_config(sft.SFTConfig, None, [f"output_dir={tmp_path}"]))
    forgetting = summary["metrics"]["forgetting"]
    plain = forgetting["plain"]
    forgotten = [s for s, d in plain["drop"].items() if d >= 0.05]
    assert forgotten
    best = summary["metrics"]["best_mitigation"]
    assert best is not None, f"no L2-SP or replay variant met the bar: {forgetting}"
    mitigation = forgetting[best["variant"]]
    assert plain["target_accuracy"] - mitigation["target_accuracy"] <= 0.03
    for skill in forgotten:
        assert mitigation["drop"][skill] <= 0.5 * plain["drop"][skill], skill
    assert summary["metrics"]["accuracy"] == plain["target_accuracy"]
    assert (tmp_path / "frontier.png").stat().st_size > 0
