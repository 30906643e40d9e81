"""Figures of the distillation run."""
from __future__ import annotations

from posttrain.report.plots import plt, save_figure


def student_bars(accuracies: dict[str, float], path, title: str) -> None:
    """One bar per model (student base, each student, teacher), labelled with its accuracy."""
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    names = list(accuracies)
    bars = ax.bar(names, [accuracies[n] for n in names], color=["tab:gray"] + ["tab:blue"] * (len(names) - 2) + ["tab:red"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
