"""What every method run does around its own algorithm: set up the output folder, evaluate on
world problems, save the model and write `summary.json` (the output contract)."""
from __future__ import annotations

from pathlib import Path

from posttrain.config import config_to_dict
from posttrain.errors import UserError
from posttrain.evaluation import evaluate
from posttrain.io import JsonlWriter, atomic_dir, write_json
from posttrain.models import count_params
from posttrain.world import render, sample_problems


def prepare_output(output_dir: str, resume: bool) -> Path:
    """Create the output folder; refuse to mix a fresh run into an older run's files."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir '{out}' is a file (expected a folder)")
    if not resume and (out / "checkpoint").exists():
        raise UserError(f"'{out}' holds an interrupted run; add --resume to continue it, or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    return out


def eval_skill(model, tokenizer, skill: str, difficulties, n: int, fmt: str, seed: int, split: str = "test") -> dict:
    """Greedy accuracy on `n` held-out problems of one skill (see evaluation.evaluate)."""
    problems = sample_problems(skill, difficulties, n, split, seed)
    return {**evaluate(model, tokenizer, problems, fmt=fmt), "prompts": [render(p, fmt)[0] for p in problems]}


def headline(result: dict) -> dict:
    """An evaluation result without the per-problem lists: what summary.json keeps."""
    return {k: v for k, v in result.items() if k not in ("completions", "correct", "prompts")}


def world_examples(skill: str, difficulties, n: int, fmt: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) training pairs from the world's train split."""
    return [render(p, fmt) for p in sample_problems(skill, difficulties, n, "train", seed, distinct=False)]


def write_samples(path: Path, result: dict, limit: int = 50) -> None:
    """A few prompts of an `eval_skill` result with their completions and verdicts, for reading by eye."""
    with JsonlWriter(path, resume_step=0) as writer:
        for prompt, completion, ok in list(zip(result["prompts"], result["completions"], result["correct"]))[:limit]:
            writer.log({"prompt": prompt, "completion": completion, "correct": bool(ok)})


def save_model(model, tokenizer, path: Path) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def write_summary(out: Path, method: str, cfg, metrics: dict, baseline: dict, model, train_result, **extra) -> dict:
    summary = {
        "method": method,
        "config": config_to_dict(cfg),
        "metrics": metrics,
        "baseline": baseline,
        "params": count_params(model),
        "time_s": train_result.time_s if train_result else 0.0,
        "tokens_per_s": train_result.tokens_per_s if train_result else None,
        **extra,
    }
    write_json(out / "summary.json", summary)
    return summary

