"""The demonstration runner behind `posttrain demo` and `run_all_demonstrations.py`.

Runs the selected methods on the embedded default model and writes, into `--output-dir`:
one folder per method (its summary.json, metrics, plots), `comparison.md` / `comparison.csv`
(the measured method comparison table), `report.html`, and `run.json` (command and machine).

Each method runs as a cached stage (posttrain/stages.py): a method whose config, code and base
model are unchanged since an earlier run is copied from the cache instead of rerun, and the
artefacts methods share (the SFT policy, reward models) are built once. Methods not built yet are
named as such and skipped, never imitated.
"""
from __future__ import annotations

import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from posttrain.io import atomic_dir, write_json
from posttrain.methods import METHODS
from posttrain.report.html import build_report
from posttrain.stages import cached_run

# Seconds per stage measured on 2 CPU cores (the README's full run; the first run also pretrains the
# base model, about 4 minutes). Only the estimate of what is left uses them.
EXPECTED_SECONDS = {"sft": 125, "lora": 115, "cot-ft": 75, "instruction": 80, "distill": 230, "reward": 180,
                    "dpo": 75, "ppo": 140, "grpo": 165, "best-of-n": 45, "self-consistency": 20, "cot-prompt": 55,
                    "tree-search": 35}
QUICK_FACTOR = 0.25


def selected_methods(category: str | None, names: list[str] | None) -> list:
    chosen = [METHODS[n] for n in names] if names else list(METHODS.values())
    return [m for m in chosen if category is None or m.category == category]


def machine_description() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.system()} {platform.machine()}, {device}, torch {torch.__version__}"


def run_demo(args) -> int:
    methods = selected_methods(args.category, args.method)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i, method in enumerate(methods):
        _announce(i, methods, started, args.quick)
        module = method.load()
        overrides = [f"{k}={v}" for k, v in module.QUICK.items()] if args.quick else []
        stage = cached_run(method.name, overrides)
        with atomic_dir(out / method.name) as tmp:
            shutil.copytree(stage, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint", "*.lock"))
    total = time.perf_counter() - started
    write_json(out / "run.json", {"command": " ".join(["run_all_demonstrations.py", *sys.argv[1:]]),
                                  "machine": machine_description(), "time_s": total,
                                  "methods": [m.name for m in methods], "quick": args.quick})
    report = build_report(out)
    print("\n" + (out / "comparison.md").read_text())
    print(f"done in {total:.0f}s; report: {report}")
    return 0


def _announce(i: int, methods: list, started: float, quick: bool) -> None:
    """One line per stage: which, how far along, elapsed and an estimate of what is left."""
    factor = QUICK_FACTOR if quick else 1.0
    left = sum(EXPECTED_SECONDS.get(m.name, 120) * factor for m in methods[i:])
    elapsed = time.perf_counter() - started
    method = methods[i]
    print(f"\n=== stage {i + 1}/{len(methods)}: [{method.category}] {method.name} ({method.title}) | "
          f"elapsed {_clock(elapsed)}, about {_clock(left)} left ===", flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"
