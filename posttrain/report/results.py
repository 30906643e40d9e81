"""docs/RESULTS.md's measured sections, written from a run folder's files alone.

`posttrain report RUN_DIR --results docs/RESULTS.md` renders the run as one block: where it ran (`run.json`:
the command, the kind of machine, the total time), the comparison table and one sentence per method (the
report's insights), all read from the runs' `summary.json` files. The block sits between two marker
comments named after the run folder; rerunning the command replaces it and leaves the rest of the file,
the hand-written prose around it, as it was. A file without the markers gets the block appended.
"""
from __future__ import annotations

from pathlib import Path

from posttrain.errors import UserError
from posttrain.io import read_json, write_text
from posttrain.report.insights import insights
from posttrain.report.table import comparison_rows, load_summaries, to_markdown


def markers(name: str) -> tuple[str, str]:
    """The comments that open and close run `name`'s block."""
    return (f"<!-- results of {name}: written by `posttrain report`, do not edit by hand -->",
            f"<!-- end of results of {name} -->")


def provenance(run_dir: Path) -> str:
    """One line: the command, the kind of machine and the time in all (`run.json`), or the folder alone."""
    if not (run_dir / "run.json").exists():
        return f"The runs in `{run_dir.name}`."
    run = read_json(run_dir / "run.json")
    machine = run.get("machine_kind") or run.get("machine", "an unrecorded machine")
    quick = " A smoke-sized run (`--quick`): it checks that every stage runs, not the methods' effects." \
        if run.get("quick") else ""
    return f"`{run.get('command', '?')}` on {machine}: {run.get('time_s', 0) / 60:.0f} minutes in all.{quick}"


def results_block(run_dir: str | Path) -> str:
    """The block for `run_dir`: provenance, comparison table, one sentence per method."""
    run_dir = Path(run_dir)
    summaries = load_summaries(run_dir)
    if not summaries:
        raise UserError(f"'{run_dir}' holds no method runs (expected <method>/summary.json folders)")
    begin, end = markers(run_dir.name)
    sentences = "\n".join(f"- {text}" for text in insights(summaries))
    return f"{begin}\n{provenance(run_dir)}\n\n{to_markdown(comparison_rows(summaries)).rstrip()}\n\n{sentences}\n{end}"


def update_results(results: str | Path, run_dir: str | Path) -> Path:
    """Write `run_dir`'s block into the markdown file `results`: in place of its old block, else at the end."""
    results, block = Path(results), results_block(run_dir)
    text = results.read_text(encoding="utf-8") if results.exists() else "# Results\n"
    begin, end = markers(Path(run_dir).name)
    if begin in text and end in text.split(begin, 1)[1]:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(results, text)
    return results
