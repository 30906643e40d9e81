"""The demonstration runner behind `posttrain demo` and `run_all_demonstrations.py`.

Runs the selected methods on the embedded default model (or, with `--model`, the methods that have
settings for that model, e.g. the real-model track on posttrain:smollm2-135m) and writes, into
`--output-dir`:
one folder per method (its summary.json, metrics, plots), `comparison.md` / `comparison.csv`
(the measured method comparison table), `report.html`, and `run.json` (command and machine).

Each method runs as a cached stage (posttrain/stages.py): a method whose config, code and base
model are unchanged since an earlier run is copied from the cache instead of rerun, and the
artefacts methods share (the SFT policy, reward models) are built once. On a CPU with two or more
cores the stages run side by side in worker processes once the base model is built (`--jobs`,
run_side_by_side).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import platform
import signal
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from posttrain.cache import stale_note
from posttrain.errors import TrainingInterrupted, UserError, raise_on_sigterm
from posttrain.io import atomic_dir, write_json
from posttrain.methods import METHODS
from posttrain.models import DEFAULT_MODEL, resolve_model_path
from posttrain.report.html import build_report
from posttrain.stages import cached_run, stage_dir, stage_overrides

# Expected seconds per stage on 2 CPU cores, one stage at a time, its base model already built (the first
# run also pretrains the base model, minutes); distill's includes building its teacher. Only the estimates
# of what is left and the weights of the side-by-side progress bar use them.
EXPECTED_SECONDS = {"sft": 300, "lora": 170, "cot-ft": 75, "instruction": 80, "distill": 160, "reward": 180,
                    "dpo": 75, "ppo": 140, "grpo": 165, "rloo": 165, "reinforce-pp": 165, "dapo": 200, "gspo": 155,
                    "expert-iteration": 170, "online-dpo": 100, "best-of-n": 45, "self-consistency": 20,
                    "cot-prompt": 110, "tree-search": 35}
QUICK_FACTOR = 0.25
REAL_MODEL_SECONDS = 900  # a method's budget on the real-model track (its presets are sized to it)
# A one-thread worker runs a stage at about this share of its speed on two threads (a second thread
# speeds a training step up about 1.6x): how fast a running stage fills its part of the progress bar.
ONE_THREAD_SPEED = 1 / 1.6


def selected_methods(category: str | None, names: list[str] | None, model: str | None = None) -> list:
    """The methods of `category` (or named), and with a `model` only those that have settings for it
    (their `PRESETS`): the real-model track runs what fits that model."""
    chosen = [METHODS[n] for n in names] if names else list(METHODS.values())
    chosen = [m for m in chosen if category is None or m.category == category]
    return [m for m in chosen if model is None or m.preset_overrides(model)]


def default_jobs() -> int:
    """Stages run side by side on a CPU with 2+ cores (one GPU runs them one at a time)."""
    return 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else whatever `platform` knows, else "CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def machine_description(name_cpu: bool = True) -> str:
    """Where the numbers came from. On a CPU it names the vector kernels torch picked (AVX2, AVX512, ...):
    they change a training step's rounding, and with it the embedded base model (docs/RESULTS.md,
    "Other CPUs"). Without `name_cpu`, the CPU's kind instead of its model name (what docs/RESULTS.md
    prints)."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        cpu = cpu_name() if name_cpu else f"{os.cpu_count()}-core CPU"
        device = f"{cpu}, {torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads"
    return f"{platform.system()} {platform.machine()}, {device}, torch {torch.__version__}"


def run_demo(args) -> int:
    model = getattr(args, "model", None)
    methods = selected_methods(args.category, args.method, model)
    if not methods:
        raise UserError(f"no selected method has settings for --model {model} (methods with them: "
                        f"{', '.join(m.name for m in selected_methods(None, None, model))})")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = 1 if model else args.jobs or default_jobs()  # a real model keeps both cores busy on its own
    started = time.perf_counter()
    if jobs == 1 or len(methods) == 1:
        run_in_turn(methods, out, args.quick, started, model=model)
    else:
        run_side_by_side(methods, out, args.quick, jobs, started)
    total = time.perf_counter() - started
    write_json(out / "run.json", {"command": " ".join(["run_all_demonstrations.py", *sys.argv[1:]]),
                                  "machine": machine_description(), "machine_kind": machine_description(name_cpu=False),
                                  "time_s": total, "jobs": jobs,
                                  "methods": [m.name for m in methods], "quick": args.quick,
                                  "model": model or DEFAULT_MODEL})
    report = build_report(out)
    print("\n" + (out / "comparison.md").read_text())
    print(f"done in {total:.0f}s; report: {report}")
    if note := stale_note():
        print(note)
    return 0


def collect(name: str, stage: Path, out: Path) -> None:
    """Copy a finished stage into the run folder (without its checkpoint and lock files)."""
    with atomic_dir(out / name) as tmp:
        shutil.copytree(stage, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint", "*.lock"))


def run_in_turn(methods: list, out: Path, quick: bool, started: float, of: list | None = None,
                model: str | None = None) -> None:
    """One stage after the other, each with every CPU thread, its progress bars on the terminal
    (`of`: the whole run's stages, for the announcement's count and estimate; `model`: the model every
    stage runs, with its preset, instead of the embedded default)."""
    of = of or methods
    for method in methods:
        _announce(of.index(method), of, started, quick, model)
        collect(method.name, cached_run(method.name, stage_overrides(method.name, quick, model)), out)


def run_side_by_side(methods: list, out: Path, quick: bool, jobs: int, started: float) -> None:
    """The embedded base model first, with every thread (every stage starts from it), then `jobs`
    worker processes, each on cores/jobs threads, take the stages in order.

    At this model size one process cannot keep two cores busy (a second thread speeds a training step
    up about 1.6x), so two single-thread stages side by side finish sooner. Stages that need the
    same artefact (the shared policy, the reward models) wait for one build: the cache locks it.
    Workers write their output to `<output-dir>/logs/<method>.log`; the terminal shows a progress bar
    weighted by each stage's expected time, the stages running, elapsed and left."""
    base = DEFAULT_MODEL + ("-quick" if quick else "")
    print(f"\n=== the base model every stage starts from: {base} | elapsed {_clock(time.perf_counter() - started)} ===",
          flush=True)
    resolve_model_path(base)  # builds and caches it on first use
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for method in methods:
        (logs / f"{method.name}.log").unlink(missing_ok=True)  # a log's presence means "running" below
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"\n=== {len(methods)} stages, {jobs} at a time on {threads} thread(s) each; their output: {logs} ===",
          flush=True)
    weight = {m.name: expected_seconds(m.name, quick) for m in methods}
    speed = ONE_THREAD_SPEED if threads == 1 else 1.0
    began, credited = {}, {}  # running stage -> when it began, and the progress counted for it so far
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                initargs=(threads,)) as pool, \
            tqdm(total=sum(weight.values()), desc="stages", bar_format=BAR, smoothing=0) as bar:
        pending = {pool.submit(build_stage, m.name, quick, str(logs / f"{m.name}.log")): m.name for m in methods}
        try:
            while pending:
                done, _ = concurrent.futures.wait(pending, timeout=2, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    name = pending.pop(future)
                    stage, seconds = _result(future, name, logs)
                    collect(name, Path(stage), out)
                    bar.write(f"  {name} done in {_clock(seconds)}")
                    bar.update(weight[name] - credited.pop(name, 0.0))
                running, now = [n for n in pending.values() if (logs / f"{n}.log").exists()], time.perf_counter()
                for name in running:
                    progress = stage_progress(weight[name], now - began.setdefault(name, now), speed)
                    bar.update(progress - credited.get(name, 0.0))
                    credited[name] = progress
                bar.set_postfix_str("running: " + ", ".join(running))
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            if signum == signal.SIGTERM:  # sent to this process alone (Ctrl-C reaches the whole process group)
                for worker in multiprocessing.active_children():
                    worker.terminate()  # SIGTERM: each stops as after Ctrl-C (raise_on_sigterm)
            pool.shutdown(wait=True, cancel_futures=True)  # each running stage saves its checkpoint first
            raise TrainingInterrupted("demo interrupted: finished stages are cached and interrupted ones "
                                      "checkpointed; the same command continues", signum) from None


def expected_seconds(name: str, quick: bool, model: str | None = None) -> float:
    """A stage's expected seconds on two cores; 1 if the cache holds it already (it is only copied)."""
    if (stage_dir(name, stage_overrides(name, quick, model)) / "summary.json").exists():
        return 1.0
    if model:
        return REAL_MODEL_SECONDS
    return EXPECTED_SECONDS.get(name, 120) * (QUICK_FACTOR if quick else 1.0)


def stage_progress(weight: float, running_s: float, speed: float) -> float:
    """The part of a running stage's `weight` (its expected seconds) counted as done after `running_s`
    seconds at `speed`: at most 90% of it, the rest when it finishes. Without it the bar would move only
    as stages finish, and its estimate of what is left, made from that rate, would start several times
    too long."""
    return min(running_s * speed, 0.9 * weight)


def _result(future, name: str, logs: Path) -> tuple[str, float]:
    """A worker's (stage folder, seconds); a failed stage's error, pointing at its log."""
    try:
        return future.result()
    except (UserError, TrainingInterrupted):
        raise
    except Exception as exc:
        raise RuntimeError(f"stage '{name}' failed: {exc!r}; its output is in {logs / f'{name}.log'}") from exc


# progress counted in expected seconds of work; elapsed and left are wall-clock
BAR = "{desc} {percentage:3.0f}%|{bar:20}| elapsed {elapsed}, about {remaining} left{postfix}"


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    raise_on_sigterm()
    os.environ["TQDM_MININTERVAL"] = "10"  # progress bars into a log file: one line per 10 s, not per step


def build_stage(name: str, quick: bool, log: str) -> tuple[str, float]:
    """Worker process: run (or reuse) one cached stage with its output in `log`; its folder and seconds."""
    start = time.perf_counter()
    with open(log, "w") as stream:
        for fd in (1, 2):  # the file descriptors, so that output from C (torch's profiler, warnings) lands there too
            os.dup2(stream.fileno(), fd)
        stage = cached_run(name, stage_overrides(name, quick))
        sys.stdout.flush()
        sys.stderr.flush()
    return str(stage), time.perf_counter() - start


def _announce(i: int, methods: list, started: float, quick: bool, model: str | None = None) -> None:
    """One line per stage: which, how far along, elapsed and an estimate of what is left."""
    left = sum(expected_seconds(m.name, quick, model) for m in methods[i:])
    elapsed = time.perf_counter() - started
    method = methods[i]
    print(f"\n=== stage {i + 1}/{len(methods)}: [{method.category}] {method.name} ({method.title}) | "
          f"elapsed {_clock(elapsed)}, about {_clock(left)} left ===", flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"
