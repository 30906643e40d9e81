"""Artefacts shared between methods: a stage runs once per configuration and is reused after.

Later methods start from earlier ones' outputs (DPO, PPO and GRPO from an SFT policy; best-of-N
from reward models). `cached_run("sft", ["difficulties=4"])` runs that method into the cache the
first time and returns its output folder every time after. The cache key covers everything the
result depends on: the resolved config, the source of the method's module, and the embedded base
model's fingerprint, so changing any of them rebuilds the stage instead of reusing a stale one.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

from posttrain.config import config_to_dict, load_config
from posttrain.methods import METHODS
from posttrain.models import EMBEDDED, EMBEDDED_PREFIX, cache_dir


def stage_key(method: str, cfg) -> str:
    module = METHODS[method].load()
    settings = {k: v for k, v in config_to_dict(cfg).items() if k != "output_dir"}
    model = settings.get("model", "")
    base = EMBEDDED[model[len(EMBEDDED_PREFIX):]].fingerprint() if model.startswith(EMBEDDED_PREFIX) else model
    blob = json.dumps({"settings": settings, "base": base, "source": inspect.getsource(module)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_run(method: str, overrides: list[str] = ()) -> Path:
    """The output folder of `method` run with `overrides`; runs it first if not cached yet."""
    from filelock import FileLock

    module = METHODS[method].load()
    cfg = load_config(module.CONFIG, None, list(overrides))
    out = cache_dir() / "stages" / f"{method}-{stage_key(method, cfg)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "summary.json").exists():  # summary.json is written last: its presence means done
            print(f"posttrain: running stage '{method}' (cached afterwards in {out})")
            cfg.output_dir = str(out)
            module.run(cfg, resume=(out / "checkpoint").exists())
    return out
