"""The formats users bring from TRL and PEFT: conversational preference records, LoRA on GPT-2's Conv1D
layers, reward models as `*ForSequenceClassification`, and best-of-N with answers but no reward model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from posttrain import lora
from posttrain.config import load_config
from posttrain.data import encode_prompt
from posttrain.errors import UserError
from posttrain.losses.sft import IGNORE
from posttrain.methods.rl import dpo
from posttrain.methods.test_time import best_of_n as bon
from posttrain.models import load_model
from posttrain.records import PreferenceRecord, read_preferences
from posttrain.reward_models import ValueHeadRewardModel, collate, encode, load_reward_model
from tests.conftest import random_model


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def write(tmp_path, *records) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


SKY = PreferenceRecord(prompt=(("user", "What color is the sky?"),), chosen="It is blue.", rejected="It is green.")
# TRL's conversational preference records (trl.data_utils: is_conversational, maybe_extract_prompt)
EXPLICIT = {"prompt": [user("What color is the sky?")], "chosen": [assistant("It is blue.")],
            "rejected": [assistant("It is green.")]}
IMPLICIT = {"chosen": [user("What color is the sky?"), assistant("It is blue.")],
            "rejected": [user("What color is the sky?"), assistant("It is green.")]}


def test_conversational_preferences_in_both_forms_read_as_a_message_prompt_and_two_replies(tmp_path):
    multi_turn = {"chosen": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4"), user("and 3+3?"),
                             assistant("6")],
                  "rejected": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4"), user("and 3+3?"),
                               assistant("7")]}
    with_string_prompt = {"prompt": "What color is the sky?", **IMPLICIT}  # TRL extracts the prompt from the lists
    records = read_preferences(write(tmp_path, EXPLICIT, IMPLICIT, with_string_prompt, multi_turn,
                                     {"prompt": "p", "chosen": "a", "rejected": "b"}))
    assert records[:3] == [SKY] * 3
    assert records[3] == PreferenceRecord((("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"),
                                           ("user", "and 3+3?")), "6", "7")
    assert records[4] == PreferenceRecord("p", "a", "b")  # strings as before


def test_the_prompt_is_what_trl_extracts(tmp_path):
    data_utils = pytest.importorskip("trl.data_utils")
    for record in (EXPLICIT, IMPLICIT):
        assert data_utils.is_conversational(record)
        extracted = data_utils.maybe_extract_prompt(record)
        assert read_preferences(write(tmp_path, record)) == [PreferenceRecord(
            tuple((m["role"], m["content"]) for m in extracted["prompt"]), *(
                reply["content"] for key in ("chosen", "rejected") for reply in extracted[key]))]


@pytest.mark.parametrize("record, expected", [
    ({"chosen": [user("sky?"), assistant("blue")], "rejected": [user("sea?"), assistant("green")]},
     ":1: field 'rejected': chosen and rejected share no prompt"),
    ({"chosen": [user("sky?"), assistant("blue")], "rejected": [user("sky?"), user("green")]},
     ":1: field 'rejected[1].role': last message must be from the assistant (it is the reply), got 'user'"),
    ({"chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
      "rejected": [user("a"), assistant("x"), user("c"), assistant("y")]},
     ":1: field 'rejected': chosen and rejected differ from chosen[1] on; they must share every message but the last"),
    ({"prompt": [user("sky?")], "chosen": "blue", "rejected": [assistant("green")]},
     ":1: field 'chosen' must be a list of {'role', 'content'} objects, got str"),
    ({"prompt": [], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
     ":1: field 'prompt' is an empty list"),
    ({"prompt": [user("sky?")], "chosen": [assistant("blue")]}, ":1: missing field 'rejected' (expected 'chosen' and"),
    ({"prompt": [{"role": "tool", "content": "x"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     ":1: field 'prompt[0].role' must be one of system, user, assistant, got 'tool'"),
    ({**EXPLICIT, "rejected": [assistant("It is blue.")]}, ":1: field 'rejected' is identical to 'chosen'"),
])
def test_malformed_conversational_records_are_one_line_errors(tmp_path, record, expected):
    path = write(tmp_path, record)
    with pytest.raises(UserError) as info:
        read_preferences(path)
    assert str(info.value).startswith(path + expected) and "\n" not in str(info.value)


def test_a_message_prompt_needs_a_chat_template(tokenizer):
    with pytest.raises(UserError, match="needs a model whose tokenizer has a chat template: give --model a chat model"):
        encode_prompt(tokenizer, SKY.prompt)


def test_dpo_trains_on_conversational_records(tmp_path, tiny_chat_model_dir):
    rows = [{"prompt": [user(f"What is {a}+{b}?")], "chosen": [assistant(f"{a + b}")],
             "rejected": [assistant(f"{a + b + 1}")]} for a in range(3) for b in range(4)]
    rows += [{"chosen": [user(f"Say {word}."), assistant(word)], "rejected": [user(f"Say {word}."), assistant("no")]}
             for word in ("yes", "maybe")]
    data = write(tmp_path, *rows)
    tokenizer = load_model(str(tiny_chat_model_dir))[1]
    (chosen_ids, chosen_labels), _ = dpo.encode_records(tokenizer, read_preferences(data)[:1])[0][0]
    prompt_ids = [i for i, label in zip(chosen_ids, chosen_labels) if label == IGNORE]
    # the message prompt rendered by the chat template, the reply learnt after it
    assert tokenizer.decode(prompt_ids) == "system: You are a helpful assistant.\nuser: What is 0+0?\nassistant: "
    cfg = load_config(dpo.DPOConfig, None, [f"model={tiny_chat_model_dir}", f"data={data}", "steps=3", "batch_size=4",
                                            "warmup_steps=1", "eval_every=0", f"output_dir={tmp_path / 'run'}"])
    metrics = dpo.run(cfg)["metrics"]
    assert metrics["pairs"] == 13 and metrics["n"] == 1 and metrics["kl"] >= 0
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["logps/chosen"] < 0


def tiny_gpt2(tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=64,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return GPT2LMHeadModel(config).eval()


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_gpt2_lora(tokenizer, ids: torch.Tensor, steps: int = 20):
    """LoRA on a tiny GPT-2's Conv1D layers, trained to predict `ids`; (model, losses)."""
    model = lora.inject(tiny_gpt2(tokenizer), GPT2_TARGETS, r=4, alpha=8.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_lora_adapts_gpt2_conv1d_layers(tokenizer):
    ids = torch.tensor([tokenizer("Q: 12+34\nA: 46")["input_ids"]])
    base = tiny_gpt2(tokenizer)
    adapted = lora.inject(tiny_gpt2(tokenizer), GPT2_TARGETS, r=4, alpha=8.0)
    # 2 blocks x (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj); r (in + out) each
    layers = lora.lora_layers(adapted)
    assert len(layers) == 8 and all(layer.fan_in_fan_out for layer in layers.values())
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 2 * 4 * (
        (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert torch.equal(logits(adapted, ids), logits(base, ids))  # B = 0: the base model at the start

    model, losses = trained_gpt2_lora(tokenizer, ids)
    assert losses[-1] < losses[0] - 0.25  # nats; a random GPT-2's small tied embeddings keep its logits near uniform
    before = logits(model, ids)
    lora.merge(model)  # the update added transposed into the (in, out) weight
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)


def test_gpt2_adapter_loads_in_peft_with_the_same_logits(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.tensor([tokenizer("Q: 12+34\nA: 46")["input_ids"]])
    model, _ = trained_gpt2_lora(tokenizer, ids, steps=5)
    lora.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / lora.CONFIG_FILE).read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(tokenizer), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)
    ours = lora.load_adapter(tiny_gpt2(tokenizer), tmp_path / "adapter").eval()  # and back into posttrain
    torch.testing.assert_close(logits(ours, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_lora_targets_matching_nothing_list_the_adaptable_layers(tokenizer):
    with pytest.raises(UserError) as info:
        lora.inject(tiny_gpt2(tokenizer), ["q_proj", "v_proj"], r=4, alpha=8.0)
    assert str(info.value) == ("LoRA target modules ['q_proj', 'v_proj'] match no linear layer (nn.Linear or Conv1D); "
                               "this model's are ['c_attn', 'c_fc', 'c_proj', 'lm_head']: set lora_targets to some of them")


PROMPTS, COMPLETIONS = ["Q: 12+34\n", "Q: 1+2\n", "Q: 5+5\n"], ["A: 46", "A: 3, or so I think", "A: 10"]


def classifier_rewards(classifier, tokenizer) -> list[float]:
    """The classifier's logits on right-padded prompt + completion + EOS rows (read at the last non-pad token)."""
    batch = collate([encode(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)], tokenizer.pad_token_id)
    with torch.no_grad():
        return classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].tolist()


def test_value_head_reward_model_saves_as_a_sequence_classifier(tokenizer, tmp_path):
    torch.manual_seed(0)
    rm = ValueHeadRewardModel(random_model(tokenizer).model, tokenizer, "orm").eval()
    rm.save(tmp_path / "orm")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "orm").eval()
    assert type(classifier).__name__ == "LlamaForSequenceClassification" and classifier.config.num_labels == 1
    assert classifier.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert len(set(scores)) == 3
    assert classifier_rewards(classifier, tokenizer) == pytest.approx(scores, abs=1e-5)
    loaded = load_reward_model(tmp_path / "orm")
    assert loaded.kind == "orm" and loaded.score(PROMPTS, COMPLETIONS) == pytest.approx(scores, abs=1e-6)


def test_a_trl_reward_model_folder_loads_as_an_orm(tokenizer, tmp_path):
    """What TRL's RewardTrainer writes: a *ForSequenceClassification and its tokenizer, no reward_model.json."""
    torch.manual_seed(0)
    config = random_model(tokenizer).config
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config).eval()
    classifier.save_pretrained(tmp_path / "trl")
    tokenizer.save_pretrained(tmp_path / "trl")
    loaded = load_reward_model(tmp_path / "trl")
    assert loaded.kind == "orm" and isinstance(loaded, ValueHeadRewardModel)
    assert loaded.score(PROMPTS, COMPLETIONS) == pytest.approx(classifier_rewards(classifier, tokenizer), abs=1e-5)


def test_a_reward_model_folder_of_backbone_and_head_still_loads(tokenizer, tmp_path):
    """The backbone layout: the transformer's own save, head.safetensors (with a bias), reward_model.json."""
    torch.manual_seed(0)
    backbone, head = random_model(tokenizer).model, nn.Linear(32, 1)
    backbone.save_pretrained(tmp_path / "old")
    tokenizer.save_pretrained(tmp_path / "old")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "old" / "head.safetensors"))
    (tmp_path / "old" / "reward_model.json").write_text(json.dumps({"kind": "orm", "aggregate": "min", "head": "value"}))
    loaded = load_reward_model(tmp_path / "old")
    rows = [encode(tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = backbone.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = torch.tensor([len(r.ids) - 1 for r in rows])
        expected = head(hidden[torch.arange(3), last]).squeeze(-1)  # w . h + b at each row's EOS
    assert loaded.head.bias is not None
    assert loaded.score(PROMPTS, COMPLETIONS) == pytest.approx(expected.tolist(), abs=1e-5)


def test_best_of_n_without_a_reward_model_selects_by_majority_beside_the_oracle(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {a}+{a}\n", "answer": 2 * a}) + "\n" for a in range(3)))
    summary = bon.run(load_config(bon.CONFIG, None, [f"model={tiny_model_dir}", f"data={data}", "problems=3", "max_n=4",
                                                     "headline_n=2", "max_new_tokens=6",
                                                     f"output_dir={tmp_path / 'run'}"]))
    assert "no reward model" in capsys.readouterr().out
    metrics = summary["metrics"]
    assert set(metrics["by_n"]) == {"n", "majority", "oracle"} and metrics["by_n"]["n"] == [1, 2, 4]
    assert metrics["headline"] == "best-of-2 with majority vote" and metrics["reward_models"] is None
    assert metrics["accuracy"] == metrics["by_n"]["majority"][1]
    assert all(m <= o + 1e-9 for m, o in zip(metrics["by_n"]["majority"], metrics["by_n"]["oracle"]))
    assert (tmp_path / "run" / "accuracy_vs_n.png").stat().st_size > 0
