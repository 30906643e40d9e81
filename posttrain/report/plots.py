"""Matplotlib figures written as PNG files (atomically, headless backend)."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from posttrain.io import write_bytes  # noqa: E402


def save_figure(fig, path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def training_curve(history: list[dict], path, title: str, metric: str = "loss", eval_metric: str | None = None) -> None:
    """Training loss against step; held-out `eval_metric` on a second axis where it was logged."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    points = [(h["step"], h[metric]) for h in history if h.get(metric) is not None]
    ax.plot(*zip(*points), color="tab:blue", label=f"train {metric}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric, color="tab:blue")
    ax.set_title(title)
    evals = [(h["step"], h[eval_metric]) for h in history if eval_metric and h.get(eval_metric) is not None]
    if evals:
        twin = ax.twinx()
        twin.plot(*zip(*evals), "o-", color="tab:orange", label=eval_metric)
        twin.set_ylabel(eval_metric, color="tab:orange")
        twin.set_ylim(0, 1)
    fig.tight_layout()
    save_figure(fig, path)


def before_after_bars(groups: dict[str, tuple[float, float]], path, title: str, ylabel: str = "accuracy") -> None:
    """Paired bars (before, after) per group, e.g. accuracy per skill before and after training."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    names = list(groups)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [groups[n][0] for n in names], width=0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [groups[n][1] for n in names], width=0.4, label="after")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
