"""Shared fixtures: a tiny random model saved as a Hugging Face folder, and the quick embedded model."""
from __future__ import annotations

import copy
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub; set before transformers is imported

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.pretraining import EOS, build_tokenizer
from posttrain.world.corpus import CorpusMix, sample_document


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    return build_tokenizer([sample_document(rng, CorpusMix(), EOS) for _ in range(300)], vocab_size=200)


def random_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A random tiny Llama and its tokenizer saved with save_pretrained, as a user's model folder would be."""
    path = tmp_path_factory.mktemp("tiny-model")
    random_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def quick_model():
    """The quick embedded base model (built once into the user cache, about a minute)."""
    from posttrain.models import ensure_embedded

    return str(ensure_embedded("tiny-quick"))


# A ChatML-style template in the shape of SmolLM2's: a default system turn, then the messages.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ 'system: You are a helpful assistant.\n' }}{% endif %}"
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, tokenizer):
    """A random tiny Llama whose tokenizer has a chat template: a chat model, as far as posttrain can tell."""
    path = tmp_path_factory.mktemp("tiny-chat-model")
    chat_tokenizer = copy.deepcopy(tokenizer)  # the shared tokenizer fixture stays template-free
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    random_model(tokenizer, seed=1).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path
