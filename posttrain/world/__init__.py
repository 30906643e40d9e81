"""The reasoning world: tasks whose answers and reasoning steps are checkable.

    skills.py   problems, answers and reference reasoning steps (addition is the main task)
    formats.py  direct / chain-of-thought / instruction renderings, answer extraction,
                the verifier (reward function) and the step checker (process labels)
    splits.py   disjoint, deterministic train / val / test splits and samplers
    corpus.py   pretraining documents for the embedded base model
"""
from posttrain.world.formats import (
    COT_TRIGGER,
    FORMATS,
    HELD_OUT_COMBINATION,
    HELD_OUT_STYLES,
    NEW_WORDINGS,
    SEEN_STYLES,
    STYLES,
    check_steps,
    completion_steps,
    extract_answer,
    first_error,
    is_seen_phrasing,
    render,
    verify,
)
from posttrain.world.skills import EASY_DIFFICULTY, MAIN_SKILL, SKILLS, Problem, random_problem
from posttrain.world.splits import SPLITS, sample_problem, sample_problems, split_of

__all__ = [
    "COT_TRIGGER", "EASY_DIFFICULTY", "FORMATS", "HELD_OUT_COMBINATION", "HELD_OUT_STYLES", "MAIN_SKILL", "NEW_WORDINGS",
    "SEEN_STYLES", "SKILLS", "SPLITS", "STYLES", "Problem", "check_steps", "completion_steps", "extract_answer",
    "first_error", "is_seen_phrasing", "random_problem", "render", "sample_problem", "sample_problems",
    "split_of", "verify",
]
