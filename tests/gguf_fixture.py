"""A tiny Llama-architecture GGUF file, written the way llama.cpp writes one, for tests that must not need
the real packaged model (tests/test_packaged.py).

    write_tiny_llama_gguf(path)   # about 270 kB: 2 layers, hidden 64, a real byte-level BPE vocabulary of 300

The tokenizer is a byte-level BPE trained here on a few sentences (the same kind SmolLM2 has, with its
special tokens and its ChatML chat template), stored as GGUF metadata: tokens, token types, merges and
the special ids. Most tensors are F32; the 2-D weights of layer 0 are Q8_0, so that loading it exercises
dequantization. `tiny_llama_tensors` gives the float32 tensors the file was written from, to compare with.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 30? The answer is 42.",
    "You are a helpful assistant. Answer the question briefly.",
    "Hello there! How are you today? I am fine, thank you.",
    "Post-training turns a base model into an assistant that follows instructions.",
    "Count the apples: one, two, three, four, five apples in the basket.",
]
ARCH = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, context=128)
QUANTIZED_LAYER = 0  # its 2-D weights are stored as Q8_0


def _bpe_vocab_and_merges(vocab_size: int = 300) -> tuple[list[str], list[str]]:
    """Tokens (in id order) and merges of a byte-level BPE trained on SENTENCES, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    assert None not in tokens, "the trained vocabulary has gaps in its ids"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def is_quantized(name: str) -> bool:
    """Whether the file stores tensor `name` as Q8_0 (the 2-D weights of layer QUANTIZED_LAYER)."""
    return name.startswith(f"blk.{QUANTIZED_LAYER}.") and not name.endswith("norm.weight")


def tiny_llama_tensors(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The file's tensors in float32 under llama.cpp's names, numpy shape (out, in) as its converter passes them.

    Random (std 0.02 for the weights, 1 +- 0.1 for the norms) and deterministic in `seed`. Tied embeddings:
    no output.weight, as in SmolLM2. q and k are not permuted the way llama.cpp's converter permutes them,
    so transformers' un-permuting load scrambles their rows; the other tensors load as they are here.
    """
    a = ARCH
    kv = a["kv_heads"] * (a["hidden"] // a["heads"])
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(a["hidden"]) * 0.1).astype(np.float32)

    tensors = {"token_embd.weight": weight(vocab, a["hidden"])}
    for i in range(a["layers"]):
        tensors |= {
            f"blk.{i}.attn_norm.weight": norm(),
            f"blk.{i}.attn_q.weight": weight(a["hidden"], a["hidden"]),
            f"blk.{i}.attn_k.weight": weight(kv, a["hidden"]),
            f"blk.{i}.attn_v.weight": weight(kv, a["hidden"]),
            f"blk.{i}.attn_output.weight": weight(a["hidden"], a["hidden"]),
            f"blk.{i}.ffn_norm.weight": norm(),
            f"blk.{i}.ffn_gate.weight": weight(a["intermediate"], a["hidden"]),
            f"blk.{i}.ffn_up.weight": weight(a["intermediate"], a["hidden"]),
            f"blk.{i}.ffn_down.weight": weight(a["hidden"], a["intermediate"]),
        }
    tensors["output_norm.weight"] = norm()
    return tensors


def write_tiny_llama_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny GGUF file to `path` (random weights, std 0.02, from `seed`) and return its path."""
    import gguf
    from gguf.quants import quantize

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, merges = _bpe_vocab_and_merges()
    a = ARCH
    head_dim = a["hidden"] // a["heads"]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(a["context"])
    writer.add_embedding_length(a["hidden"])
    writer.add_block_count(a["layers"])
    writer.add_feed_forward_length(a["intermediate"])
    writer.add_head_count(a["heads"])
    writer.add_head_count_kv(a["kv_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    special = set(SPECIAL_TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, data in tiny_llama_tensors(len(tokens), seed).items():
        if is_quantized(name):  # uint8 blocks: the writer reads the logical shape back from their byte shape
            writer.add_tensor(name, quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
