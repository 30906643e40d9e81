"""Pretraining the embedded base models: a tiny Llama-architecture transformer trained from scratch on the
reasoning world's corpus, with a byte-level BPE tokenizer trained on the same corpus.

The embedded model is deliberately small (about a million parameters) so every method runs on a
laptop CPU in minutes; its corpus is mostly easy problems, so it knows the world's formats but is
weak at the main task's harder difficulties. `models.ensure_embedded` builds one on first use and
caches it; `posttrain pretrain NAME` builds one by hand.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.io import atomic_dir, write_json
from posttrain.world.corpus import CorpusMix, sample_document

PAD, EOS = "<pad>", "<eos>"
WORLD_VERSION = 2  # bump when the world's text formats change: it invalidates cached base models


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """Architecture, tokenizer, corpus and pretraining schedule of an embedded base model."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 384  # byte-level BPE trained on the corpus; digits stay single tokens
    seq_len: int = 256  # pretraining window, also the model's maximum context
    corpus_tokens: int = 2_000_000  # size of the token stream windows are cut from
    steps: int = 900
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "world": WORLD_VERSION, "mix": repr(CorpusMix())}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


EMBEDDED = {
    "tiny": BaseModelConfig(),
    # Seconds to build: for tests and `--quick` runs. Knows the formats, not much arithmetic.
    "tiny-quick": BaseModelConfig(corpus_tokens=600_000, steps=400, seq_len=128),
    # Under a quarter of tiny's parameters (0.21M vs 0.90M), same tokenizer and corpus: the distillation student.
    "tiny-student": BaseModelConfig(hidden_size=64, intermediate_size=160),
    # its quick twin, for `--quick` runs
    "tiny-student-quick": BaseModelConfig(hidden_size=64, intermediate_size=160, corpus_tokens=600_000, steps=400,
                                          seq_len=128),
}


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, saved and loaded as a standard HF tokenizer.

    Each digit is its own pre-token (with its leading space, if any), so numbers are spelled
    digit by digit: column arithmetic is then a matter of attention, not of memorising numbers.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\d| ?[A-Za-z']+| ?[^\sA-Za-z\d]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, model_max_length=4096)


def new_model(cfg: BaseModelConfig, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(cfg.seq_len, 1024), tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def corpus_stream(cfg: BaseModelConfig, tokenizer) -> torch.Tensor:
    """A 1-D token stream of whole documents, about `corpus_tokens` long."""
    rng = random.Random(cfg.seed)
    ids: list[int] = []
    while len(ids) < cfg.corpus_tokens:
        docs = [sample_document(rng, CorpusMix(), EOS) for _ in range(512)]
        for row in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids[: cfg.corpus_tokens])


def pretrain(name: str, output_dir: Path) -> Path:
    """Pretrain embedded model `name` from scratch and save it (HF format) into `output_dir`."""
    from posttrain.forward import causal_lm_loss
    from posttrain.training import TrainingConfig, train

    cfg = EMBEDDED[name]
    final = output_dir
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer([sample_document(rng, CorpusMix(), EOS) for _ in range(4000)], cfg.vocab_size)
    stream = corpus_stream(cfg, tokenizer)
    model = new_model(cfg, tokenizer)

    def batch(step: int) -> dict:
        # Random windows of the stream, a pure function of (seed, step) so a resumed run sees the same data.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.batch_size,), generator=g)
        input_ids = torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])
        return {"input_ids": input_ids, "labels": input_ids}

    loop = TrainingConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=0.1, log_every=50, checkpoint_every=0, seed=cfg.seed,
    )
    work = final.parent / f".{final.name}.work"
    result = train(model, batch, causal_lm_loss, loop, work, desc=f"pretraining {name}")
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / "posttrain_base.json", {
            "name": name, "config": dataclasses.asdict(cfg), "fingerprint": cfg.fingerprint(),
            "final_loss": result.final_metrics.get("loss"), "time_s": result.time_s,
            "tokens_per_s": result.tokens_per_s, "params": sum(p.numel() for p in model.parameters()),
        })
    return final
