"""The demonstration runner: stages side by side in worker processes, their results collected."""
import argparse
import concurrent.futures
import json

import pytest

from posttrain import demo
from posttrain.errors import UserError


def test_two_jobs_run_every_stage_and_keep_each_workers_log(tmp_path, quick_model):
    """The base model is built in this process, the three stages in two single-thread workers."""
    methods = ["cot-prompt", "self-consistency", "tree-search"]
    args = argparse.Namespace(category=None, method=methods, quick=True, output_dir=str(tmp_path), jobs=2)
    assert demo.run_demo(args) == 0
    for name in methods:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["method"] == name and not list((tmp_path / name).glob("*.lock"))
    assert all((tmp_path / "logs" / f"{name}.log").exists() for name in methods)  # each stage's output
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["jobs"] == 2 and run["methods"] == methods
    assert (tmp_path / "comparison.md").exists() and (tmp_path / "report.html").exists()


def test_a_failed_stage_names_its_log(tmp_path):
    crashed = concurrent.futures.Future()
    crashed.set_exception(ValueError("boom"))
    with pytest.raises(RuntimeError, match=r"stage 'dpo' failed: ValueError\('boom'\).*dpo\.log"):
        demo._result(crashed, "dpo", tmp_path)
    refused = concurrent.futures.Future()
    refused.set_exception(UserError("bad config"))
    with pytest.raises(UserError, match="bad config"):  # users' errors pass through as they are
        demo._result(refused, "dpo", tmp_path)


def test_jobs_must_be_a_positive_whole_number(capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--jobs", "0"])
    assert exit_info.value.code == 2 and "--jobs: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_machine_description_names_the_cpu_kernels_that_set_the_rounding(monkeypatch):
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(demo, "cpu_name", lambda: "Example CPU 9000")
    assert ", Example CPU 9000, AVX2 kernels, 3 threads, torch " in demo.machine_description()


def test_a_running_stage_counts_its_time_at_the_workers_speed_up_to_most_of_its_weight():
    """A 100-second stage in a one-thread worker: after 48 s, 48 / 1.6 = 30 expected seconds are done;
    after an hour it still counts only 90 of its 100 until it finishes."""
    assert demo.stage_progress(100, 48, demo.ONE_THREAD_SPEED) == pytest.approx(30)
    assert demo.stage_progress(100, 3600, demo.ONE_THREAD_SPEED) == pytest.approx(90)


def test_a_cached_stage_is_expected_to_take_a_second_and_others_their_listed_time(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    assert demo.expected_seconds("sft", quick=False) == demo.EXPECTED_SECONDS["sft"]
    assert demo.expected_seconds("sft", quick=True) == demo.EXPECTED_SECONDS["sft"] * demo.QUICK_FACTOR
    done = demo.stage_dir("sft", demo.stage_overrides("sft", False))
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    assert demo.expected_seconds("sft", quick=False) == 1.0
    assert demo.expected_seconds("sft", quick=True) == demo.EXPECTED_SECONDS["sft"] * demo.QUICK_FACTOR
