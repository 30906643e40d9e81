"""The `posttrain` command: parse, load the method's config, call its `run(cfg)`. Nothing else.

    posttrain sft --output-dir runs/sft lr=5e-4 steps=400
    posttrain sft --config my.yaml --model ./my-model --data train.jsonl
    posttrain pretrain                 # build (or rebuild) the embedded base model
    posttrain demo --category fine-tuning --quick
    posttrain cache --prune            # remove cached stages the current code can no longer reuse
"""
from __future__ import annotations

import argparse
import json
import sys

from posttrain import __version__
from posttrain.errors import TrainingInterrupted, UserError, exit_status, sigterm_as_interrupt
from posttrain.methods import CATEGORIES, METHODS, methods_overview

EPILOG = f"""methods:
{methods_overview()}

Each method takes key=value overrides of its config; `posttrain METHOD --show-config` lists them.
Every run writes summary.json, metrics.jsonl, plots and its model to --output-dir."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain", description="LLM post-training methods in plain PyTorch, each run for real.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for method in METHODS.values():
        sub = commands.add_parser(method.name, help=method.title, description=method.title, add_help=False)
        sub.add_argument("-h", "--help", action=MethodHelp, method=method)
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        sub.add_argument("--config", help="YAML file of config values (overrides on the command line win)")
        sub.add_argument("--output-dir", help="where the run writes its files")
        sub.add_argument("--model", help="posttrain:tiny (default), a local model folder, or a hub id")
        if method.data:  # the others compare things only the world can vary (formats, phrasings, step checks)
            sub.add_argument("--data", help=f"{method.data}, instead of the world's problems: a JSONL or Parquet "
                             "file, or a folder saved by datasets' save_to_disk")
        sub.add_argument("--quick", action="store_true", help="a small, fast run (smoke tests, first look)")
        sub.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
        sub.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    pretrain = commands.add_parser("pretrain", help="build the embedded base model (cached; --force rebuilds)")
    pretrain.add_argument("--model", default="posttrain:tiny", help="embedded model name (posttrain:tiny, posttrain:tiny-quick)")
    pretrain.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    demo = commands.add_parser("demo", help="run the demonstrations (same flags as run_all_demonstrations.py)")
    add_demo_arguments(demo)
    report = commands.add_parser("report", help="rebuild report.html and the comparison table of a demo run folder")
    report.add_argument("run_dir", help="the --output-dir of a demonstration run")
    report.add_argument("--results", metavar="FILE", help="also write the run's table and findings into this markdown "
                        "file (e.g. docs/RESULTS.md), replacing its earlier block for the same run folder")
    cache = commands.add_parser("cache", help="list the cached base models and stages; --prune removes stale ones",
                                description="List what posttrain keeps in its cache ($POSTTRAIN_CACHE, else "
                                "~/.cache/posttrain): the embedded base models and the shared stages, each with "
                                "its size and whether the current code can still reuse it.")
    removal = cache.add_mutually_exclusive_group()
    removal.add_argument("--prune", action="store_true", help="remove the entries the current code cannot reuse")
    removal.add_argument("--clear", action="store_true", help="remove every entry (they are rebuilt when needed)")
    return parser


class MethodHelp(argparse.Action):
    """A method's -h/--help: the usual help, then its config keys with their defaults and meaning (the
    method's module is imported only here, so `posttrain --help` stays quick)."""

    def __init__(self, option_strings, dest, method, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help and the method's config keys, then exit")
        self.method = method

    def __call__(self, parser, namespace, values, option_string=None):
        from posttrain.config import describe_config

        parser.print_help()
        keys = describe_config(self.method.load().CONFIG).replace("\n", "\n  ")
        print(f"\nconfig keys (set with key=value; --quick and --config change the defaults shown):\n  {keys}")
        parser.exit()


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return int(text)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--category", choices=CATEGORIES, help="run only this category's methods")
    parser.add_argument("--method", action="append", choices=list(METHODS), help="run only this method (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small, fast runs of every selected method")
    parser.add_argument("--output-dir", default="runs/demo", help="one subfolder per method (default: runs/demo)")
    parser.add_argument("--model", help="run the methods that have settings for this model (e.g. "
                        "posttrain:smollm2-135m, the real-model track) instead of the embedded default")
    parser.add_argument("--jobs", type=_positive_int, default=None,
                        help="stages run side by side after the first (default: 2 on a CPU with 2+ cores, 1 on a GPU)")


def method_config(method, args):
    """The method's config: defaults, then those for a user's model or data (methods/__init__.py: only keys
    nothing below sets, each kind announced in one line), then the --config YAML, then --quick (less the keys
    a user's model has defaults for: its values are the embedded model's), the preset of --model (the module's
    `PRESETS`), the flags and key=value, each overriding the ones before."""
    from posttrain.config import given_keys, load_config

    module = method.load()
    named = method.preset_overrides(getattr(args, "model", None)) + list(args.overrides)
    named += [f"{k}={v}" for k in ("output_dir", "model", "data") if (v := getattr(args, k, None)) is not None]
    quick = method.quick_overrides() if args.quick else []
    plain = load_config(module.CONFIG, args.config, quick + named)
    given = given_keys(module.CONFIG, args.config, named)
    check_data_has_model(method.name, plain, given)
    defaults = users_defaults(method, plain, given)
    if not defaults:
        return module, plain
    quick = [o for o in quick if o.partition("=")[0] not in defaults]
    return module, load_config(module.CONFIG, args.config, quick + named, defaults)


def check_data_has_model(name: str, cfg, given: set[str]) -> None:
    """Refuse `--data` on the default model when that is the shared SFT policy: it is trained on the embedded
    world's additions, and its first use builds it (pretraining included: tens of minutes)."""
    from posttrain.rollouts import POLICIES

    if getattr(cfg, "data", None) and "model" not in given and cfg.model in POLICIES:
        raise UserError(f"{name} --data: give --model, the model to run on your records (the default "
                        f"'{cfg.model}' is the embedded world's addition policy; model={cfg.model} uses it anyway)")


def users_defaults(method, cfg, given: set[str]) -> dict:
    """The defaults a user's model or data gets in place of the embedded world's (those `given` keys leave),
    each kind announced in one line on stderr."""
    mine = {k: v for k, v in method.user_defaults(cfg.model, getattr(cfg, "data", None)).items() if k not in given}
    params, large = method.large_model_defaults(cfg.model)
    large = {k: v for k, v in large.items() if k not in given}
    if mine:  # on stderr, as the large model's line: --show-config's stdout stays JSON
        print(f"posttrain: {method.name} with your model or data: {_settings(mine)} (the embedded world's "
              "defaults need its stages or sweep several trainings; set them to choose)", file=sys.stderr)
    if large:
        print(f"posttrain: {params / 1e6:.0f}M-parameter model: TRL's defaults {_settings(large)} "
              "(set them to override)", file=sys.stderr)
    return {**mine, **large}


def _settings(values: dict) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items())


def run_method(name: str, args) -> int:
    method = METHODS[name]
    module, cfg = method_config(method, args)
    if args.show_config:
        from posttrain.config import config_to_dict

        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    summary = module.run(cfg, resume=args.resume)
    from posttrain.methods.common import is_main_process

    if is_main_process():
        print(f"{name}: {_headline(summary)} ({summary['time_s']:.0f}s); wrote {cfg.output_dir}/summary.json")
    return 0


def _headline(summary: dict) -> str:
    """Before -> after of the run's headline: the held-out NLL of SFT on user data (exact match beside it),
    else accuracy."""
    def change(key: str) -> str:
        return " -> ".join(_fraction(summary[part].get(key)) for part in ("baseline", "metrics"))

    if "heldout_nll" in summary["metrics"]:
        return f"held-out NLL {change('heldout_nll')} (exact match {change('accuracy')})"
    return f"accuracy {change('accuracy')}"


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with a method's `key=value` overrides allowed anywhere among its options (argparse alone
    takes them only in one run: `sft lr=1e-4 --quick steps=5` would leave `steps=5` unrecognised)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [token for token in extra if "=" in token and not token.startswith("-")]
    unknown = [token for token in extra if token not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        with sigterm_as_interrupt():  # `kill` and job schedulers stop a run as Ctrl-C does: checkpoint, one line
            return run_command(parser, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt as exc:  # outside a training loop (sampling, evaluation): nothing to resume from
        print("\ninterrupted; no checkpoint was saved at this point, so run the command again", file=sys.stderr)
        return exit_status(exc)
    finally:
        leave_process_group()


def run_command(parser: argparse.ArgumentParser, args) -> int:
    """Run the chosen command; `main` turns what it raises into one line and an exit status."""
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "pretrain":
        return run_pretrain(args)
    if args.command == "demo":
        from posttrain.demo import run_demo

        return run_demo(args)
    if args.command == "report":
        return run_report(args.run_dir, args.results)
    if args.command == "cache":
        from posttrain.cache import run_cache

        return run_cache(args.prune, args.clear)
    return run_method(args.command, args)


def leave_process_group() -> None:
    """Close the torchrun process group this process joined, if any. Left open until the interpreter exits, a
    rank aborted there in 4 of 40 two-process runs ("terminate called without an active exception"; 0 of 40
    closed), and torchrun reports a run that had finished and saved everything as failed."""
    dist = sys.modules.get("torch.distributed")  # torch never imported (--help, report): no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_report(run_dir: str, results: str | None = None) -> int:
    from posttrain.report.html import build_report
    from posttrain.report.results import update_results

    print(f"wrote {build_report(run_dir)}")
    if results:
        print(f"wrote {update_results(results, run_dir)}")
    return 0


def run_pretrain(args) -> int:
    import shutil

    from posttrain.models import EMBEDDED_PREFIX, embedded_path, ensure_embedded
    from posttrain.pretraining import EMBEDDED

    name = args.model.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED:
        choices = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED)
        raise UserError(f"unknown embedded model '{args.model}'; expected one of: {choices}")
    if args.force:
        shutil.rmtree(embedded_path(name), ignore_errors=True)
    print(f"embedded model ready: {ensure_embedded(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
