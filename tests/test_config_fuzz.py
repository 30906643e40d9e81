"""Config fuzz: seeded malformed values for every method's config keys, through the path the CLI takes
(`load_config` with a YAML file and `key=value` overrides, then `validate`). Each case must be accepted
or refused with a `UserError` (one line and exit 2 at the CLI), never another exception."""
import dataclasses
import math
import random

import pytest
import yaml

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.methods import METHODS

CASES_PER_METHOD = 60

# As typed on a command line: non-finite, negative, zero, huge, tiny, empty, and not numbers at all.
OVERRIDE_TEXTS = ["nan", "NaN", "inf", "-inf", "1e999", "-1", "-0.5", "0", "-0", "1", "0.5", "2", "1e308", "-1e308",
                  "1e-320", "99999999999999999999999", "", " ", "abc", "[", "]", "[]", "1,2", "1,,2", "none", "null",
                  "true", "yes", "plain", "l2sp:-1", "replay:1", "'", "\"\"", "\u00e9", "0x10", "1_000", "--1"]
# As YAML types them in a --config file.
YAML_VALUES = [float("nan"), float("inf"), -float("inf"), -1, 0, 10**30, -(10**30), 1e-320, True, False, None, "",
               "nan", [], [float("nan")], [-1, 2], ["a", 1], {"a": 1}, [[1]], "x" * 300]


def fuzz_case(rng: random.Random, keys: list[str]) -> tuple[dict, list[str]]:
    """(YAML mapping, overrides) setting one to three random keys to random malformed values."""
    chosen = rng.sample(keys, k=min(len(keys), rng.randint(1, 3)))
    in_yaml = {key: rng.choice(YAML_VALUES) for key in chosen if rng.random() < 0.4}
    overrides = [f"{key}={rng.choice(OVERRIDE_TEXTS)}" for key in chosen if key not in in_yaml]
    return in_yaml, overrides


def floats(cfg) -> list[float]:
    """Every float a config holds, in lists too."""
    found = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        found += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, float)]
    return found


@pytest.mark.parametrize("name", list(METHODS))
def test_malformed_config_values_are_accepted_or_refused_in_one_line(name, tmp_path):
    config_class = METHODS[name].load().CONFIG
    keys = [f.name for f in dataclasses.fields(config_class) if f.init]
    rng = random.Random(name)
    path = tmp_path / "config.yaml"
    for _ in range(CASES_PER_METHOD):
        in_yaml, overrides = fuzz_case(rng, keys)
        path.write_text(yaml.safe_dump(in_yaml))
        try:
            cfg = load_config(config_class, str(path), overrides)
            assert all(math.isfinite(v) for v in floats(cfg)), (in_yaml, overrides, cfg)
        except UserError as exc:
            assert "\n" not in str(exc), (in_yaml, overrides, str(exc))
        except Exception as exc:  # noqa: BLE001 - any other exception is a traceback at the CLI
            pytest.fail(f"{name} {in_yaml} {overrides}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("override,key,allowed", [
    ("max_grad_norm=-1", "max_grad_norm", ">= 0"),  # would clip by a negative factor: gradient ascent
    ("min_lr_ratio=-0.5", "min_lr_ratio", "in [0, 1]"),  # a negative learning rate late in the cosine
    ("checkpoint_every=-1", "checkpoint_every", ">= 0"),  # checkpointed every step
    ("lr=-1", "lr", "> 0"),
    ("weight_decay=-1", "weight_decay", ">= 0"),
    ("log_every=0", "log_every", ">= 1"),
    ("warmup_steps=-2", "warmup_steps", ">= 0"),
    ("seed=-1", "seed", "in [0, 4294967295]"),
])
def test_out_of_range_training_keys_are_refused_naming_the_range(override, key, allowed):
    with pytest.raises(UserError, match=f"config key '{key}' must be {allowed.replace('[', '.').replace(']', '.')}"):
        load_config(METHODS["sft"].load().CONFIG, None, [override])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_floats_are_refused_for_every_float_key(value):
    with pytest.raises(UserError, match="'lr' .*expected a finite number"):
        load_config(METHODS["sft"].load().CONFIG, None, [f"lr={value}"])
    with pytest.raises(UserError, match="'temperature' .*expected a finite number"):
        load_config(METHODS["best-of-n"].load().CONFIG, None, [f"temperature={value}"])
