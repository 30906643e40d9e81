"""The comparison table and report.html, built from a run folder's files alone."""
import csv
import json
import re
import shutil
import subprocess

import pytest

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.demo import selected_methods
from posttrain.methods import METHODS
from posttrain.methods.finetuning import sft

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, quick_model):
    root = tmp_path_factory.mktemp("demo")
    overrides = [f"{k}={v}" for k, v in sft.QUICK.items()] + [f"model={quick_model}", f"output_dir={root / 'sft'}"]
    sft.run(load_config(sft.SFTConfig, None, overrides + ["difficulties=2"]))
    assert main(["report", str(root)]) == 0
    return root


def test_table_numbers_come_from_the_summaries(run_dir):
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    row = next(csv.DictReader((run_dir / "comparison.csv").open()))
    assert row["method"] == "sft" and row["category"] == "fine-tuning"
    assert float(row["accuracy before"]) == summary["baseline"]["accuracy"]
    assert float(row["accuracy after"]) == summary["metrics"]["accuracy"]
    assert int(row["trainable params"]) == summary["params"]["trainable"]
    assert float(row["tokens / problem"]) == summary["metrics"]["generated_tokens"] / summary["metrics"]["n"]
    assert row["KL"] == ""  # SFT reports none: the cell stays empty rather than invented
    page = (run_dir / "report.html").read_text()
    assert f"{summary['metrics']['accuracy']:.3f}" in page and f"{summary['baseline']['accuracy']:.3f}" in page


def test_results_file_gets_the_runs_block_in_place_of_its_old_one(run_dir, tmp_path):
    """`report --results FILE` writes the run's provenance, table and findings between markers named after the
    run folder; run again after the run changed, it replaces that block and keeps the prose around it."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nProse before.\n")
    run = tmp_path / "demo-x"
    shutil.copytree(run_dir, run)
    (run / "run.json").write_text(json.dumps({"command": "run_all_demonstrations.py --quick", "time_s": 600,
                                              "machine": "Linux x86_64, Some CPU 9000", "machine_kind": "Linux x86_64, 2-core CPU",
                                              "quick": True}))
    assert main(["report", str(run), "--results", str(results)]) == 0
    results.write_text(results.read_text() + "\nProse after.\n")
    summary = json.loads((run / "sft" / "summary.json").read_text())
    summary["metrics"]["accuracy"] = 0.123456
    (run / "sft" / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(run), "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\nProse before.\n") and text.endswith("Prose after.\n")
    assert text.count("<!-- results of demo-x") == 1 and text.count("| sft | fine-tuning |") == 1
    assert "| 0.123 |" in text and "on Linux x86_64, 2-core CPU: 10 minutes in all. A smoke-sized run" in text


def test_report_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == len(list((run_dir / "sft").glob("*.png"))) >= 2


def test_a_quick_runs_table_and_report_say_it_is_smoke_sized(run_dir, tmp_path):
    assert "Smoke-sized" not in (run_dir / "comparison.md").read_text()
    quick = tmp_path / "quick"
    shutil.copytree(run_dir, quick)
    (quick / "run.json").write_text(json.dumps({"command": "run_all_demonstrations.py --quick", "machine": "CPU",
                                                "time_s": 1.0, "quick": True}))
    assert main(["report", str(quick)]) == 0
    assert (quick / "comparison.md").read_text().startswith("Smoke-sized run (--quick)")
    assert "Smoke-sized run (--quick)" in (quick / "report.html").read_text()


def test_report_command_needs_a_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no method runs" in capsys.readouterr().err


def test_selection_runs_exactly_the_named_stages():
    assert [m.name for m in selected_methods("rl", None)] == [n for n, m in METHODS.items() if m.category == "rl"]
    assert [m.name for m in selected_methods(None, ["sft", "dpo"])] == ["sft", "dpo"]
    assert selected_methods("test-time", ["sft"]) == []


PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const net = performance.getEntriesByType('resource').filter(e => !e.name.startsWith('data:')).length;
  document.title = `images ${ok}/${imgs.length} network ${net}`;
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_with_every_plot_loaded(run_dir, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text((run_dir / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    n = len(list((run_dir / "sft").glob("*.png")))
    assert title == f"images {n}/{n} network 0", title


def test_test_time_rows_show_inference_cost_and_no_training():
    from posttrain.report.table import row

    cost = {"n": [1, 2, 4], "generated_tokens_per_problem": [10.0, 20.0, 40.0],
            "sampling_seconds_per_problem": [0.1, 0.2, 0.4]}
    summary = {"category": "test-time", "metrics": {"accuracy": 0.6, "cost": cost}, "baseline": {"accuracy": 0.5},
               "config": {"headline_n": 2},
               "params": {"trainable": 5, "total": 5}, "time_s": 3.0}
    cells = row("best-of-n", summary)
    assert (cells["tokens / problem"], cells["s / problem"]) == (20.0, 0.2)
    assert cells["train time (s)"] is None and cells["trainable params"] is None
    assert cells["gain"] == pytest.approx(0.1)


def test_the_report_draws_the_frontiers_of_the_runs_it_is_given(tmp_path, monkeypatch):
    """The reward-KL frontiers side by side come from the run folder's summaries alone: every run that measured
    one (dpo, grpo), none that did not (sft), and none from a folder beside it."""
    from posttrain.report import rl_plots

    def run(folder, name, frontier):
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps({
            "method": name, "category": "rl", "baseline": {"accuracy": 0.4}, "time_s": 1.0,
            "metrics": {"accuracy": 0.5, **({"frontier": frontier} if frontier else {})}}))

    line = [{"step": 0, "accuracy": 0.4, "kl": 0.0}, {"step": 4, "accuracy": 0.5, "kl": 0.2}]
    run(tmp_path / "runs", "dpo", line)
    run(tmp_path / "runs", "grpo", line)
    run(tmp_path / "runs", "sft", None)
    run(tmp_path / "elsewhere", "ppo", line)
    drawn, draw = [], rl_plots.reward_kl_frontier
    monkeypatch.setattr(rl_plots, "reward_kl_frontier",
                        lambda runs, path: (drawn.append((sorted(runs), path)), draw(runs, path)))
    assert main(["report", str(tmp_path / "runs")]) == 0
    assert drawn == [(["dpo", "grpo"], tmp_path / "runs" / "reward_kl_frontier.png")]
