"""Tests for posttrain.config: precedence, type conversion and error messages."""

from __future__ import annotations  # annotations become strings: load_config must resolve them

import dataclasses
from typing import Optional

import pytest

from posttrain.config import config_to_dict, describe_config, load_config
from posttrain.errors import UserError


@dataclasses.dataclass
class Cfg:
    lr: float = 1e-4
    steps: int = 10
    greedy: bool = False
    name: str = "run"
    model: str | None = None
    seed: Optional[int] = 0
    ranks: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    betas: tuple[float, ...] = (0.9, 0.99)
    tags: list[str] = dataclasses.field(default_factory=list)
    shape: tuple[int, str] = (1, "a")
    beta: float = dataclasses.field(default=0.1, metadata={"help": "KL strength"})


@dataclasses.dataclass
class Commented:
    steps: int = 10  # optimizer steps
    # the seed of
    # everything
    seed: int = 0
    plain: int = 1


@dataclasses.dataclass
class CommentedChild(Commented):
    steps: int = 20
    extra: str = "x"  # a new key


@dataclasses.dataclass
class Checked:
    lr: float = 1e-4

    def validate(self) -> None:
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults():
    assert load_config(Cfg) == Cfg()


def test_yaml_then_overrides_win(tmp_path):
    path = write(tmp_path, "lr: 0.5\nsteps: 3\nname: from-yaml\n")
    cfg = load_config(Cfg, path, ["steps=7", "greedy=yes"])
    assert (cfg.lr, cfg.steps, cfg.name, cfg.greedy) == (0.5, 7, "from-yaml", True)


def test_override_conversions():
    cfg = load_config(
        Cfg,
        overrides=["lr=3e-5", "steps= 12", "model=gpt2", "seed=none", "ranks=1,2,4",
                   "betas=0.5, 0.6", "tags=a,b", "shape=3,x", "name=a=b", "tags="],
    )
    assert cfg.lr == 3e-5 and cfg.steps == 12 and cfg.model == "gpt2" and cfg.seed is None
    assert cfg.ranks == [1, 2, 4] and cfg.betas == (0.5, 0.6) and cfg.shape == (3, "x")
    assert cfg.name == "a=b" and cfg.tags == []


def test_lists_as_help_shows_them():
    """--help prints defaults as Python lists (`ranks: list[int] = [1, 2]`); typing them back that way works."""
    cfg = load_config(Cfg, overrides=["ranks=[4, 8]", "tags=['q_proj', \"v_proj\"]", "betas=(0.5,0.6)"])
    assert cfg.ranks == [4, 8] and cfg.tags == ["q_proj", "v_proj"] and cfg.betas == (0.5, 0.6)
    assert load_config(Cfg, overrides=["ranks=[]"]).ranks == [] and load_config(Cfg, overrides=["ranks=[ ]"]).ranks == []
    with pytest.raises(UserError, match="expected a comma-separated list of ints, got '\\[1, a\\]'"):
        load_config(Cfg, overrides=["ranks=[1, a]"])


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("YES", True), ("no", False),
                                        ("1", True), ("0", False)])
def test_bool_spellings(text, value):
    assert load_config(Cfg, overrides=[f"greedy={text}"]).greedy is value


def test_yaml_typed_values(tmp_path):
    path = write(tmp_path, "lr: 1\nranks: [3, 4]\nbetas: [0.1, 0.2]\nmodel: null\nseed: 5\nbeta: 1e-3\nshape: [2, b]\n")
    cfg = load_config(Cfg, path)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # int accepted for float
    assert cfg.ranks == [3, 4] and cfg.betas == (0.1, 0.2) and cfg.model is None and cfg.seed == 5
    assert cfg.beta == 1e-3  # YAML 1.1 reads `1e-3` as a string; it must still parse
    assert cfg.shape == (2, "b")


def test_yaml_scalar_for_list_is_one_item(tmp_path):
    assert load_config(Cfg, write(tmp_path, "ranks: 8\n")).ranks == [8]


def test_empty_yaml_means_defaults(tmp_path):
    assert load_config(Cfg, write(tmp_path, "# nothing\n")) == Cfg()


@pytest.mark.parametrize("override,expected", [
    ("lr=abc", "config key 'lr' (command line): expected a float, got 'abc'"),
    ("steps=1.5", "expected an int, got '1.5'"),
    ("greedy=maybe", "expected a bool"),
    ("seed=x", "expected an int or none, got 'x'"),
    ("ranks=1,a", "expected a comma-separated list of ints, got '1,a'"),
    ("shape=1", "expected a comma-separated list of 2 values (int, str)"),
])
def test_bad_override_values(override, expected):
    with pytest.raises(UserError) as info:
        load_config(Cfg, overrides=[override])
    assert expected in str(info.value)


@pytest.mark.parametrize("yaml_text,expected", [
    ("steps: true\n", "expected an int, got True"),
    ("name: 2024\n", "expected a string, got 2024"),
    ("lr: [1]\n", "expected a float, got [1]"),
    ("greedy: 2\n", "expected a bool"),
    ("steps: null\n", "expected an int, got None"),
])
def test_bad_yaml_values(tmp_path, yaml_text, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(UserError) as info:
        load_config(Cfg, path)
    assert f"({path})" in str(info.value) and expected in str(info.value)


def test_unknown_key_from_command_line():
    with pytest.raises(UserError) as info:
        load_config(Cfg, overrides=["lrr=1"])
    message = str(info.value)
    assert "unknown config key 'lrr' (command line)" in message
    assert "did you mean 'lr'?" in message
    assert "valid keys: beta, betas, greedy, lr, model, name, ranks, seed, shape, steps, tags" in message


def test_trls_names_set_the_same_keys_from_yaml_and_command_line(tmp_path):
    """A config written with TRL's names carries over: learning_rate is lr, max_steps is steps; a TRL name whose
    setting this config lacks is still an unknown key."""
    cfg = load_config(Checked, write(tmp_path, "learning_rate: 0.002\n"))
    assert cfg.lr == 0.002
    assert load_config(Commented, None, ["max_steps=7"]).steps == 7
    with pytest.raises(UserError, match="unknown config key 'learning_rate'"):
        load_config(Commented, None, ["learning_rate=1e-4"])


def test_unknown_key_from_yaml_without_suggestion(tmp_path):
    path = write(tmp_path, "zzzzzz: 1\n")
    with pytest.raises(UserError) as info:
        load_config(Cfg, path)
    assert f"unknown config key 'zzzzzz' ({path})" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_override_without_equals():
    with pytest.raises(UserError, match="expected the form key=value"):
        load_config(Cfg, overrides=["lr"])


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_config(Cfg, str(tmp_path / "nope.yaml"))


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "lr: 1\nsteps: [1, 2\nname: x\n")
    with pytest.raises(UserError) as info:
        load_config(Cfg, path)
    assert str(info.value).startswith(f"{path}:3: invalid YAML (")


def test_yaml_not_a_mapping(tmp_path):
    path = write(tmp_path, "- lr\n- steps\n")
    with pytest.raises(UserError, match="expected a mapping of config keys to values, got list"):
        load_config(Cfg, path)


def test_validate_hook_is_called():
    assert load_config(Checked, overrides=["lr=0.1"]).lr == 0.1
    with pytest.raises(UserError, match="lr must be positive"):
        load_config(Checked, overrides=["lr=0"])


def test_config_to_dict_is_json_friendly():
    d = config_to_dict(Cfg())
    assert d["betas"] == [0.9, 0.99] and d["shape"] == [1, "a"] and d["ranks"] == [1, 2]


def test_describe_config():
    lines = describe_config(Cfg).splitlines()
    assert lines[0] == "lr: float = 0.0001"
    assert "model: str | None = None" in lines
    assert "ranks: list[int] = [1, 2]" in lines
    assert lines[-1] == "beta: float = 0.1  # KL strength"


def test_describe_config_reads_each_fields_comment_from_the_source_and_keeps_a_base_classs():
    assert describe_config(CommentedChild).splitlines() == [
        "steps: int = 20  # optimizer steps", "seed: int = 0  # the seed of everything", "plain: int = 1",
        "extra: str = 'x'  # a new key"]
