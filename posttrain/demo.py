"""The demonstration runner behind `posttrain demo` and `run_all_demonstrations.py`.

Runs the selected methods on the embedded default model, one output folder per method, and prints
what each measured. Methods not built yet are named as such and skipped, never imitated.
"""
from __future__ import annotations

import time
from pathlib import Path

from posttrain.config import load_config
from posttrain.methods import METHODS


def selected_methods(category: str | None, names: list[str] | None) -> list:
    chosen = [METHODS[n] for n in names] if names else list(METHODS.values())
    return [m for m in chosen if category is None or m.category == category]


def run_demo(args) -> int:
    methods = selected_methods(args.category, args.method)
    results, skipped = [], [m for m in methods if not m.available]
    for method in skipped:
        print(f"[{method.category}] {method.name}: not available yet in this version; skipped")
    for method in (m for m in methods if m.available):
        module = method.load()
        overrides = [f"{k}={v}" for k, v in module.QUICK.items()] if args.quick else []
        cfg = load_config(module.CONFIG, None, overrides + [f"output_dir={Path(args.output_dir) / method.name}"])
        print(f"\n=== [{method.category}] {method.name}: {method.title} ===")
        start = time.perf_counter()
        summary = module.run(cfg)
        results.append((method, summary, time.perf_counter() - start))
    print("\n" + comparison_table(results))
    return 0


def comparison_table(results) -> str:
    """Method, category, held-out accuracy before -> after, and wall time of the whole stage."""
    rows = ["| method | category | accuracy before | accuracy after | gain | stage time (s) |", "|---|---|---|---|---|---|"]
    for method, summary, seconds in results:
        before, after = summary["baseline"]["accuracy"], summary["metrics"]["accuracy"]
        rows.append(f"| {method.name} | {method.category} | {before:.3f} | {after:.3f} | {after - before:+.3f} | {seconds:.0f} |")
    return "\n".join(rows)
