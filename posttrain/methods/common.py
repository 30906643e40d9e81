"""What every method run does around its own algorithm: set up the output folder, evaluate on
world problems, save the model and write `summary.json` (the output contract)."""
from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
from pathlib import Path

from posttrain import lora
from posttrain.config import config_to_dict
from posttrain.errors import UserError
from posttrain.evaluation import evaluate
from posttrain.io import JsonlWriter, atomic_dir, read_json, recover_dir, write_json
from posttrain.methods import METHODS
from posttrain.models import count_params
from posttrain.rollouts import POLICIES
from posttrain.training import CHECKPOINT, state_bytes
from posttrain.world import render, sample_problems
from posttrain.world.flaws import demonstration


def policy_path(name: str) -> str:
    """A model name for load_model: the shared SFT policy for 'sft-policy[-quick]' (built and cached on first
    use: minutes), else `name` itself. Called at the top of a method's `run`, so a run says what it starts from
    before anything slow."""
    if name not in POLICIES:
        return name
    from posttrain.stages import policy  # stages imports the methods: resolved here, at call time

    return str(policy(quick=POLICIES[name]) / "model")


def reward_model_path(reward: str, reward_model: str | None, policy: str) -> str | None:
    """The reward-model folder a run scores with: `reward_model` if given; for reward=orm/prm on the shared SFT
    policy, that kind's model of the cached `reward` stage (built on first use); None for other rewards."""
    if reward not in ("orm", "prm") or reward_model:
        return reward_model
    if policy not in POLICIES:
        raise UserError(f"reward={reward} with model '{policy}': give reward_model=FOLDER (one `posttrain reward` wrote)")
    from posttrain.stages import cached_run

    return str(cached_run("reward", METHODS["reward"].quick_overrides() if POLICIES[policy] else []) / reward)

def prepare_output(output_dir: str, resume: bool) -> Path:
    """Check the output folder before anything slow; refuse to mix a fresh run into an older run's files.

    The folder is not created here: the run's first file creates it, so a run that fails while loading its
    model leaves no empty folder behind. Whether one can be created is tried now, beside where it will be."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir '{out}' is a file (expected a folder)")
    recover_dir(out / CHECKPOINT)  # a checkpoint write killed part-way
    if not resume and (out / CHECKPOINT).exists():
        raise UserError(f"'{out}' holds an interrupted run; add --resume to continue it, or choose another --output-dir")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Create and remove a scratch folder in `out`, or in its nearest existing parent: a read-only place
    (/proc, /sys, another user's folder, a full disk) fails here in one line."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".posttrain-write-check-").cleanup()
    except OSError as exc:
        raise UserError(f"output dir '{out}' cannot be created or written in '{existing}' ({exc.strerror})") from None


def remove_checkpoints(out: Path, cfg) -> None:
    """A finished run's checkpoints (its own and its variants'), unless `keep_checkpoint`: left behind, one would
    mark the folder as holding an interrupted run."""
    if getattr(cfg, "keep_checkpoint", False) or not out.is_dir():
        return
    for checkpoint in [p for p in out.rglob(CHECKPOINT) if p.is_dir()]:
        shutil.rmtree(checkpoint)


def eval_skill(model, tokenizer, skill: str, difficulties, n: int, fmt: str, seed: int, split: str = "test") -> dict:
    """Greedy accuracy on `n` held-out problems of one skill (see evaluation.evaluate)."""
    problems = sample_problems(skill, difficulties, n, split, seed)
    return {**evaluate(model, tokenizer, problems, fmt=fmt), "prompts": [render(p, fmt)[0] for p in problems]}


def headline(result: dict) -> dict:
    """An evaluation result without the per-problem lists: what summary.json keeps."""
    return {k: v for k, v in result.items() if k not in ("completions", "correct", "prompts", "references", "_main")}


def world_examples(skill: str, difficulties, n: int, fmt: str, seed: int,
                   slip_rate: float = 0.0) -> list[tuple[str, str]]:
    """(prompt, completion) training pairs from the world's train split; a `slip_rate` share of the
    chain-of-thought additions come from the sloppy demonstrator (world/flaws.py)."""
    rng = random.Random(seed)
    problems = sample_problems(skill, difficulties, n, "train", seed, distinct=False)
    return [demonstration(p, fmt, rng, slip_rate) for p in problems]


def write_samples(path: Path, result: dict, limit: int = 50) -> None:
    """A few prompts of an evaluation result (`eval_skill`'s, or a user's held-out records') with their
    completions, the reference answers or completions where the result has them, and verdicts, for reading
    by eye."""
    if not is_main_process():
        return
    references = result.get("references") or [None] * len(result["prompts"])
    rows = zip(result["prompts"], result["completions"], references, result["correct"])
    with JsonlWriter(path, resume_step=0) as writer:
        for prompt, completion, reference, ok in list(rows)[:limit]:
            given = {} if reference is None else {"reference": reference}
            writer.log({"prompt": prompt, "completion": completion, **given, "correct": bool(ok)})


def is_main_process() -> bool:
    """True outside distributed runs, and on rank 0 of a torchrun / accelerate launch."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save_model(model, tokenizer, path: Path) -> None:
    """`model` and `tokenizer` as a Hugging Face folder, written atomically; a disk without room for the weights
    fails in one line before anything is written (io.atomic_dir)."""
    if not is_main_process():
        return
    with atomic_dir(path, state_bytes(model.state_dict()), "the model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def save_policy(model, tokenizer, out: Path, base_model: str) -> None:
    """A trained policy as a Hugging Face folder (`out/model`); one trained with LoRA also as its PEFT
    adapter on `base_model` (`out/adapter`), and merged into `out/model`."""
    if not lora.lora_layers(model):
        save_model(model, tokenizer, out / "model")
        return
    if is_main_process():
        lora.save_adapter(model, out / "adapter", base_model=base_model)
    save_model(lora.merge_and_unload(copy.deepcopy(model)), tokenizer, out / "model")


def resumable(path: Path, resume: bool, compute) -> dict:
    """`compute()`'s result, kept as JSON at `path`; a `--resume` run reads it back instead of recomputing.

    For runs that train several models from one base (SFT variants, CoT vs direct answers): each
    finished model leaves its result, so an interrupted run continues with the first unfinished one.
    Fresh and resumed runs both return the JSON round trip, so they hold identical values (string keys).
    """
    if resume and path.exists():
        return read_json(path)
    result = json.loads(json.dumps(compute()))  # the same JSON round trip a resumed run reads back
    if is_main_process():
        write_json(path, result)
    return result


def write_summary(out: Path, method: str, cfg, metrics: dict, baseline: dict, model, train_result,
                  unread: tuple[str, ...] = (), **extra) -> dict:
    """summary.json: the resolved config (less the `unread` keys, which this run never read: a --data run's
    world settings), metrics, baseline, parameter counts and timing."""
    summary = {
        "method": method,
        "category": METHODS[method].category,  # what the report reads: it never imports the methods
        "title": METHODS[method].title,
        "config": {key: value for key, value in config_to_dict(cfg).items() if key not in unread},
        "metrics": metrics,
        "baseline": baseline,
        "params": count_params(model),
        "time_s": train_result.time_s if train_result else 0.0,
        "tokens_per_s": train_result.tokens_per_s if train_result else None,
        **extra,
    }
    if is_main_process():
        write_json(out / "summary.json", summary)
        remove_checkpoints(out, cfg)
    return summary

