"""Artefacts shared between methods: a stage runs once per configuration and is reused after.

Later methods start from earlier ones' outputs (DPO, PPO and GRPO from an SFT policy; best-of-N
from reward models). `cached_run("sft", ["difficulties=4"])` runs that method into the cache the
first time and returns its output folder every time after. The cache key covers everything the
result depends on: the resolved config, the code of the whole package (a change to a loss, the
loop or the world counts as much as one to the method; docstrings and comments do not count) and the
embedded base model's
fingerprint, so changing any of them rebuilds the stage instead of reusing a stale one. The stage's
folder keeps those inputs (`stage.json`), which is how `posttrain cache --prune` tells the folders
the current code can still reuse from the stale ones.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

import posttrain

from posttrain import locks
from posttrain.config import config_to_dict, load_config
from posttrain.io import write_json
from posttrain.methods import METHODS
from posttrain.models import EMBEDDED_PREFIX, base_model_fingerprint, cache_dir


DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def source_digest(text: str) -> str:
    """A hash of a module's code alone: the `ast.dump` of its syntax tree with the module's, classes'
    and functions' docstrings removed. Comments, docstrings, blank lines and line numbers leave it
    unchanged (a docstring edit must not rebuild every cached stage); any change to what runs changes
    it. The tree's form is Python's, so another Python version may give other digests. Text that does
    not parse is hashed as it is."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return hashlib.sha256(text.encode()).hexdigest()
    for node in ast.walk(tree):
        if isinstance(node, DOCSTRING_OWNERS) and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


@functools.cache
def source_fingerprint() -> str:
    """A hash of the code of every Python file of the package (`source_digest`), read once per process."""
    digest = hashlib.sha256()
    root = Path(posttrain.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + source_digest(path.read_text(encoding="utf-8")).encode())
    return digest.hexdigest()


RECORD = "stage.json"  # in each stage's folder: the inputs its key hashes (what `posttrain cache` reads)


def stage_record(method: str, cfg) -> dict:
    """Everything a stage's result depends on; its hash is the cache key."""
    settings = {k: v for k, v in config_to_dict(cfg).items() if k != "output_dir"}
    model = settings.get("model", "")
    base = base_model_fingerprint(model[len(EMBEDDED_PREFIX):]) if model.startswith(EMBEDDED_PREFIX) else model
    return {"method": method, "settings": settings, "base": base, "source": source_fingerprint()}


def stage_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


# The embedded world's shared stages beyond their defaults: the reward models are trained with both PRMs (the
# step checker's labels and Math-Shepherd's), so best-of-N and tree search measure each.
WORLD_STAGE_SETTINGS = {"reward": ["prm_labels=both"]}


def stage_overrides(name: str, quick: bool, model: str | None = None) -> list[str]:
    """A stage's settings: --quick's and the world's (WORLD_STAGE_SETTINGS), or with a `model` that model and
    its preset (cli.method_config's order)."""
    overrides = METHODS[name].quick_overrides() if quick else []
    if model:
        return overrides + [*METHODS[name].preset_overrides(model), f"model={model}"]
    return overrides + WORLD_STAGE_SETTINGS.get(name, [])


def stage_dir(method: str, overrides: list[str] = ()) -> Path:
    """Where the cache keeps `method` run with `overrides` (done when its summary.json, written last, exists)."""
    cfg = load_config(METHODS[method].load().CONFIG, None, list(overrides))
    return cache_dir() / "stages" / f"{method}-{stage_key(stage_record(method, cfg))}"


def cached_run(method: str, overrides: list[str] = ()) -> Path:
    """The output folder of `method` run with `overrides`; runs it first if not cached yet. This process uses
    it from then on: `posttrain cache` leaves it alone until the process ends (posttrain/locks.py)."""
    out = stage_dir(method, overrides)
    done = lambda: (out / "summary.json").exists()  # noqa: E731
    while not locks.use(out, done):
        with locks.building(out):
            if not done():
                _run_stage(method, overrides, out)
    return out


def _run_stage(method: str, overrides: list[str], out: Path) -> None:
    """Run `method` into the cache folder `out`, continuing an interrupted run of it."""
    print(f"posttrain: running stage '{method}' (cached afterwards in {out})")
    module = METHODS[method].load()
    cfg = load_config(module.CONFIG, None, list(overrides))
    out.mkdir(exist_ok=True)
    write_json(out / RECORD, stage_record(method, cfg))
    cfg.output_dir = str(out)
    module.run(cfg, resume=(out / "checkpoint").exists())


# The shared starting policy of reward modelling, DPO/PPO/GRPO and test-time scaling:
# chain-of-thought SFT on 4-digit addition from 2000 demonstrations, 60% of them by the sloppy
# demonstrator that forgets the carry of a column totalling 10 (world/flaws.py). It learns the
# procedure and the slip: on the held-out problems with such a column it slips greedily every time,
# yet writes the right carry in some of its samples (temperature 1), and most of its samples over all
# held-out problems are right: the methods' job is to find and reinforce the right ones. (From a few
# hundred clean demonstrations instead, the policy's errors are misread operand digits, which neither
# RL nor same-size reward models correct in minutes.)
POLICY = ["difficulties=4", "train_examples=2000", "steps=250", "slip_rate=0.6", "eval_problems=300",
          "old_skill_problems=50", "variants=plain"]
# Its smoke-sized twin on the quick base model, for fast tests (2-digit addition).
POLICY_QUICK = ["model=posttrain:tiny-quick", "difficulties=2", "train_examples=256", "steps=100",
                "eval_problems=100", "old_skill_problems=20", "variants=plain"]


def policy(quick: bool = False) -> Path:
    """Output folder of the shared SFT policy (its model is in `<folder>/model`)."""
    return cached_run("sft", POLICY_QUICK if quick else POLICY)
