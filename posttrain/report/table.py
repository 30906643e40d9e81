"""The measured method comparison table, built from each run's summary.json alone.

One row per method: training wall time (none for the test-time methods, which only spend inference
compute), inference cost per problem (generated tokens and seconds of the headline evaluation),
trainable parameters, held-out accuracy before and after, and the KL
from the starting model where the method reports one. A cell is empty when the run did not
measure that quantity; nothing is filled in by assumption.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from posttrain.errors import UserError
from posttrain.io import read_json

COLUMNS = ["method", "category", "train time (s)", "tokens / problem", "s / problem", "trainable params",
           "trainable %", "accuracy before", "accuracy after", "gain", "KL"]
# A chat model's runs also measure what it loses outside the task (chat_world.GeneralProbe): the NLL per token
# of the start model's replies to general requests, before and after. Shown when some run has them.
GENERAL_COLUMNS = ["NLL elsewhere before", "NLL elsewhere after"]


CATEGORIES = ("fine-tuning", "rl", "test-time")  # the table's order of categories


def load_summaries(run_dir: str | Path) -> dict[str, dict]:
    """method name -> summary, for every `<run_dir>/<method>/summary.json`: in the order the run's `run.json`
    lists its methods, else by category, then name."""
    run_dir = Path(run_dir)
    found = {path.parent.name: read_summary(path) for path in run_dir.glob("*/summary.json")}
    listed = read_json(run_dir / "run.json").get("methods", []) if (run_dir / "run.json").exists() else []

    def order(name: str) -> tuple:
        category = found[name].get("category")
        rank = CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)
        return (listed.index(name) if name in listed else len(listed), rank, name)

    return {name: found[name] for name in sorted(found, key=order)}


def read_summary(path: Path) -> dict:
    """A run's summary.json, refused in one line naming the file when it is not JSON or lacks what a run writes
    (its `metrics` and `baseline` objects)."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise UserError(f"{path}: expected a run summary (a JSON object), got {type(summary).__name__}")
    for key in ("metrics", "baseline"):
        if not isinstance(summary.get(key), dict):
            raise UserError(f"{path}: not a run summary: '{key}' should be an object, got {summary.get(key)!r:.60}")
        accuracy = summary[key].get("accuracy")
        if accuracy is not None and not isinstance(accuracy, (int, float)):
            raise UserError(f"{path}: '{key}.accuracy' should be a number, got {accuracy!r:.60}")
    return summary


def _per_problem(metrics: dict, key: str):
    if metrics.get(key) is None or not metrics.get("n"):
        return None
    return metrics[key] / metrics["n"]


def test_time_cost(name: str, summary: dict) -> tuple[float | None, float | None]:
    """(generated tokens, seconds) per problem of a test-time method's headline setting, from its summary."""
    metrics, cfg = summary.get("metrics", {}), summary.get("config", {})
    if name == "best-of-n" and "cost" in metrics:
        at = metrics["cost"]["n"].index(cfg["headline_n"])
        return metrics["cost"]["generated_tokens_per_problem"][at], metrics["cost"]["sampling_seconds_per_problem"][at]
    if name == "self-consistency" and "generated_tokens" in metrics:
        return metrics["generated_tokens"] / cfg["problems"], None
    if name == "cot-prompt" and "models" in metrics:
        return metrics["models"]["base"]["by_style"]["few-shot CoT"]["generated_tokens"] / cfg["problems"], None
    if name == "tree-search" and "generated_tokens_per_problem" in metrics:
        return metrics["generated_tokens_per_problem"], metrics["search_seconds"] / cfg["problems"]
    return None, None


def row(name: str, summary: dict) -> dict:
    metrics, baseline, params = summary.get("metrics", {}), summary.get("baseline", {}), summary.get("params", {})
    before, after = baseline.get("accuracy"), metrics.get("accuracy")
    trainable, total = params.get("trainable"), params.get("total")
    test_time = summary.get("category") == "test-time"  # no training: they spend inference compute
    trains = not test_time and bool(trainable) and summary.get("time_s")
    if test_time:
        tokens, seconds = test_time_cost(name, summary)
    else:
        tokens, seconds = _per_problem(metrics, "generated_tokens"), _per_problem(metrics, "seconds")
    return {
        "method": name,
        "category": summary.get("category"),
        "train time (s)": summary.get("time_s") if trains else None,
        "tokens / problem": tokens,
        "s / problem": seconds,
        "trainable params": trainable if trains else None,
        "trainable %": 100 * trainable / total if trains and total else None,
        "accuracy before": before,
        "accuracy after": after,
        "gain": after - before if before is not None and after is not None else None,
        "KL": metrics.get("kl"),
        "NLL elsewhere before": baseline.get("general_nll"),
        "NLL elsewhere after": metrics.get("general_nll"),
    }


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS, and GENERAL_COLUMNS when a row has them."""
    return COLUMNS + (GENERAL_COLUMNS if any(r[c] is not None for r in rows for c in GENERAL_COLUMNS) else [])


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def comparison_rows(summaries: dict[str, dict]) -> list[dict]:
    return [row(name, summary) for name, summary in summaries.items()]


def to_markdown(rows: list[dict]) -> str:
    shown = columns(rows)
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    shown = columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=shown, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({c: "" if r[c] is None else r[c] for c in shown} for r in rows)
    return buffer.getvalue()
