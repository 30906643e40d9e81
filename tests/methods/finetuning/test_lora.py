"""LoRA: the layer's maths by hand, merge equivalence, PEFT-format parity both ways, and runs of
`posttrain lora` that show the adapter learns with a few percent of the parameters."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from posttrain import lora
from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.methods.finetuning import lora as lora_method
from tests.conftest import random_model

QUICK = [f"{k}={v}" for k, v in lora_method.QUICK.items()]


def randomised_layer(r=2, alpha=4.0, dropout=0.0) -> lora.LoRALinear:
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(6, 5), r=r, alpha=alpha, dropout=dropout)
    nn.init.normal_(layer.lora_B)  # B starts at zero; give it values so the update is visible
    return layer


def test_forward_is_w_x_plus_scaled_b_a_x():
    """y = W x + b + (alpha / r) B A x, with alpha / r = 4 / 2 = 2, written out with explicit matmuls."""
    layer = randomised_layer()
    x = torch.randn(3, 6)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ w.T + b + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)


def test_zero_initialised_b_starts_at_the_base_layer():
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(3, 6)
    assert torch.equal(layer.lora_B, torch.zeros(5, 4)) and layer.lora_A.abs().sum() > 0
    torch.testing.assert_close(layer(x), base(x))


def test_dropout_acts_on_the_low_rank_input_only():
    """With dropout 0.5 in training mode the base path is untouched: zeroing B gives W x + b exactly."""
    layer = randomised_layer(dropout=0.5).train()
    x = torch.randn(64, 6)
    assert not torch.allclose(layer(x), layer(x))  # two dropout masks, two outputs
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_merge_and_unmerge_are_equivalent_to_the_adapter():
    layer = randomised_layer().eval()
    x = torch.randn(3, 6)
    w0, before = layer.base_layer.weight.clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0 + 2.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before)


def test_inject_freezes_the_model_and_counts_r_times_in_plus_out(tokenizer):
    model = lora.inject(random_model(tokenizer), ["q_proj", "v_proj"], r=4, alpha=8.0)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # 2 layers x {q_proj, v_proj} x (A: 4 x 32 + B: 32 x 4) = 4 x 256
    assert sum(trainable.values()) == 1024
    assert all(".lora_A" in n or ".lora_B" in n for n in trainable)
    with pytest.raises(UserError, match="match no linear layer"):
        lora.inject(random_model(tokenizer), ["c_attn"], r=4, alpha=8.0)


def test_the_adapters_initialisation_depends_on_the_seed_alone(tokenizer):
    def a_matrices(seed, draws_before):
        torch.rand(draws_before)  # random numbers some other work drew first
        model = lora.inject(random_model(tokenizer), ["q_proj", "v_proj"], r=4, alpha=8.0, seed=seed)
        return [layer.lora_A.detach().clone() for layer in lora.lora_layers(model).values()]

    first = a_matrices(seed=3, draws_before=0)
    assert all(torch.equal(a, b) for a, b in zip(first, a_matrices(seed=3, draws_before=1000)))
    assert not torch.equal(first[0], a_matrices(seed=4, draws_before=0)[0])
    assert not torch.equal(first[0], first[1])  # each layer its own draw


def adapted_random_model(tokenizer, targets=("q_proj", "v_proj", "down_proj")):
    model = lora.inject(random_model(tokenizer), list(targets), r=4, alpha=8.0)
    torch.manual_seed(1)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    return model.eval()


@torch.no_grad()
def test_disabled_adapters_give_the_base_model_exactly(tokenizer):
    """Inside `lora.disabled` the adapted model's logits are the base model's (the RL reference with LoRA),
    bit for bit; outside it the update is back."""
    base, adapted = random_model(tokenizer), adapted_random_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 7))
    with lora.disabled(adapted):
        assert torch.equal(adapted(ids).logits, base(ids).logits)
    assert not torch.allclose(adapted(ids).logits, base(ids).logits, atol=1e-3)
    lora.merge(adapted)
    with pytest.raises(ValueError, match="merged"):
        with lora.disabled(adapted):
            pass
    with pytest.raises(ValueError, match="no LoRA layers"):  # a silent no-op would make the policy its own reference
        with lora.disabled(base):
            pass


@torch.no_grad()
def test_saved_adapter_has_peft_keys_and_peft_loads_it(tokenizer, tmp_path):
    from peft import PeftModel

    model = adapted_random_model(tokenizer)
    lora.save_adapter(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    ids = torch.tensor([tokenizer("Q: 12+34\nA: 46")["input_ids"]])
    peft_model = PeftModel.from_pretrained(random_model(tokenizer), tmp_path / "adapter").eval()
    gap = (peft_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert gap < 1e-4
    assert (model(input_ids=ids).logits - random_model(tokenizer)(input_ids=ids).logits).abs().max() > 1e-2


@torch.no_grad()
def test_adapter_trained_by_peft_loads_into_ours(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(random_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(random_model(tokenizer), tmp_path / "peft").eval()
    ids = torch.tensor([tokenizer("Q: 12+34\n")["input_ids"]])
    assert (ours(input_ids=ids).logits - peft_model.eval()(input_ids=ids).logits).abs().max() < 1e-4


def test_load_adapter_refuses_what_it_cannot_load(tokenizer, tmp_path):
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        lora.load_adapter(random_model(tokenizer), tmp_path)
    lora.save_adapter(adapted_random_model(tokenizer), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        lora.load_adapter(random_model(tokenizer), tmp_path / "a")


def test_memory_probe_silences_stderr_only_while_it_runs(capfd):
    """The profiler's C++ lines go to file descriptor 2; the probe hides them and nothing after."""
    with lora_method.stderr_silenced():
        os.write(2, b"USDT: profiler_start\n")
    os.write(2, b"visible\n")
    with pytest.raises(RuntimeError, match="still raised"), lora_method.stderr_silenced():
        raise RuntimeError("still raised")
    assert capfd.readouterr().err == "visible\n"


@pytest.fixture(scope="module")
def quick_base():
    """The model QUICK adapts: the shared quick SFT policy (built once, cached)."""
    from posttrain.methods.common import policy_path

    return policy_path(lora_method.QUICK["model"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    cfg = load_config(lora_method.LoRAConfig, None, QUICK + [f"output_dir={out}"])
    return out, lora_method.run(cfg)


def test_quick_lora_learns_with_a_few_percent_of_the_parameters(quick_run):
    out, summary = quick_run
    metrics = summary["metrics"]
    assert summary["params"]["trainable"] / summary["params"]["total"] == metrics["trainable_fraction"] < 0.05
    assert metrics["accuracy"] >= summary["baseline"]["accuracy"] + 0.15
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    # every adapted layer moved away from W, and further as training went on
    for values in metrics["adaptation_magnitude"]["layers"].values():
        assert 0 < values[0] < values[-1]
    assert metrics["rank_sweep"] == [{**metrics["rank_sweep"][0], "r": 8}] and metrics["rank_sweep"][0]["accuracy"] == metrics["accuracy"]
    full = metrics["full_ft"]
    assert full["trainable"] == full["total"] and metrics["peak_memory_mb"] < full["peak_memory_mb"]
    for name in ("rank_sweep.png", "adaptation_magnitude.png", "samples.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0


@torch.no_grad()
def test_quick_run_merges_exactly_and_its_adapter_loads_in_peft(quick_run, quick_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, summary = quick_run
    assert summary["metrics"]["merge_max_abs_diff"] < 1e-4
    ids = torch.tensor([[5, 17, 40, 41, 42, 9, 3]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(quick_base), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(quick_base).eval()
    assert (peft_model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 1e-4
    assert (base(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() > 1e-2  # the adapter did something


@pytest.mark.slow
def test_default_lora_matches_full_fine_tuning_at_rank_8(tmp_path):
    """The bar: r = 8 trains <= 5% of the parameters and lands within 5 points of full fine-tuning."""
    summary = lora_method.run(load_config(lora_method.LoRAConfig, None, [f"output_dir={tmp_path}"]))
    metrics = summary["metrics"]
    assert metrics["trainable_fraction"] <= 0.05
    assert metrics["accuracy"] >= metrics["full_ft"]["accuracy"] - 0.05
    assert metrics["accuracy"] >= summary["baseline"]["accuracy"] + 0.20
    assert [row["r"] for row in metrics["rank_sweep"]] == [1, 2, 4, 8, 16]
    assert metrics["merge_max_abs_diff"] < 1e-4
