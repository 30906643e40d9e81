"""The self-contained HTML report of a demonstration run (`report.html`).

Built from the run folder's files alone (`<method>/summary.json`, `<method>/*.png`, `run.json`):
plots are embedded as data URIs and there is no script, stylesheet or font from the network, so
the file opens offline and can be mailed around. `posttrain report DIR` rebuilds it.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from posttrain.errors import UserError
from posttrain.io import read_json, write_text
from posttrain.report.insights import insights
from posttrain.report.rl_plots import draw_frontiers, draw_pg_family
from posttrain.report.table import comparison_rows, load_summaries, to_csv, to_markdown

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, td:nth-child(2) { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; } .plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots figure { margin: 0; width: 48%; } figcaption { font-size: 0.85em; color: #555; }
code { background: #f5f5f5; padding: 1px 4px; }
"""


def _table_html(rows: list[dict]) -> str:
    markdown = to_markdown(rows).splitlines()
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in markdown[2:]]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows_html}</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = html.escape(path.stem.replace("_", " "))
    return f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def _method_section(run_dir: Path, name: str, summary: dict) -> str:
    kind = ": ".join(html.escape(summary[key]) for key in ("category", "title") if summary.get(key))
    before, after = summary["baseline"].get("accuracy"), summary["metrics"].get("accuracy")
    numbers = f"held-out accuracy {before:.3f} &rarr; {after:.3f}" if before is not None and after is not None else ""
    plots = "".join(_image(p) for p in sorted((run_dir / name).glob("*.png")))
    return (f"<h3>{html.escape(name)}{f' <small>({kind})</small>' if kind else ''}</h3>"
            f"<p>{numbers}; run folder <code>{html.escape(name)}/</code></p><div class='plots'>{plots}</div>")


# A --quick run's numbers are true but not the methods' effects: say so wherever its table appears.
QUICK_CAVEAT = ("Smoke-sized run (--quick): quick base models, 2-digit problems and a few steps per method check "
                "that every stage runs end to end. Several methods show no effect, or a negative one, at this size; "
                "the default run measures them.")


def build_report(run_dir: str | Path) -> Path:
    """Write `comparison.md`, `comparison.csv`, `report.html` and, when two or more runs measured them, the
    methods' reward-KL frontiers side by side (`reward_kl_frontier.png`) and the policy-gradient family at equal
    samples (`pg_family.png`) into `run_dir`, from its files alone."""
    run_dir = Path(run_dir)
    summaries = load_summaries(run_dir)
    if not summaries:
        raise UserError(f"'{run_dir}' holds no method runs (expected <method>/summary.json folders)")
    rows = comparison_rows(summaries)
    run_info = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    caveat = QUICK_CAVEAT if run_info.get("quick") else ""
    write_text(run_dir / "comparison.md", (f"{caveat}\n\n" if caveat else "") + to_markdown(rows))
    write_text(run_dir / "comparison.csv", to_csv(rows))
    origin = (f"Command <code>{html.escape(run_info['command'])}</code> on {html.escape(run_info['machine'])}, "
              f"{run_info['time_s']:.0f} s in all." if run_info else f"Runs in <code>{html.escape(str(run_dir))}</code>.")
    if caveat:
        origin += f" <strong>{html.escape(caveat)}</strong>"
    items = "".join(f"<li>{html.escape(text)}</li>" for text in insights(summaries)) or "<li>No method ran.</li>"
    sections = "".join(_method_section(run_dir, n, s) for n, s in summaries.items())
    frontier, family = draw_frontiers(summaries, run_dir), draw_pg_family(summaries, run_dir)
    family_html = "".join(f"<h2>{title}</h2><div class='plots'>{_image(plot)}</div>" for title, plot in (
        ("Reward-KL frontiers: held-out accuracy against KL to the start", frontier),
        ("Policy-gradient family at equal samples", family)) if plot)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain report</title><style>{STYLE}</style></head>
<body>
<h1>posttrain report</h1>
<p>{origin} Every number below is read from the runs' <code>summary.json</code> files.</p>
<h2>Method comparison</h2>
{_table_html(rows)}
<h2>Key insights</h2>
<ul>{items}</ul>
{family_html}
<h2>Methods</h2>
{sections}
</body></html>
"""
    write_text(run_dir / "report.html", page)
    return run_dir / "report.html"
