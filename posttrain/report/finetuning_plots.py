"""Figures of the fine-tuning methods: the forgetting frontier, accuracy by group, error positions."""
from __future__ import annotations

from posttrain.report.plots import plt, save_figure


def frontier(points: dict[str, tuple[float, float]], base: tuple[float, float], path, title: str) -> None:
    """Old-skill accuracy (y) against target accuracy (x): one labelled point per variant, the base a star."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([base[0]], [base[1]], marker="*", s=160, color="black", zorder=3)
    ax.annotate("base", base, textcoords="offset points", xytext=(6, 4))
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=50, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4))
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("target-task accuracy (held out)")
    ax.set_ylabel("old-skill accuracy (mean over skills)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def grouped_bars(series: dict[str, dict[str, float]], path, title: str, ylabel: str = "accuracy") -> None:
    """One bar per series inside each group: `series` maps a series name to {group: value}."""
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    groups = list(next(iter(series.values())))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        heights = [values.get(g) or 0.0 for g in groups]  # a group the series did not measure: no bar
        ax.bar([i + offset for i in range(len(groups))], heights, width=width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def accuracy_by_difficulty(curves: dict[str, dict[int, float]], path, title: str, xlabel: str = "digits") -> None:
    """Accuracy against difficulty, one line per model (e.g. CoT-trained and direct-trained)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, by_difficulty in curves.items():
        xs = sorted(by_difficulty)
        ax.plot(xs, [by_difficulty[x] for x in xs], "o-", label=name)
    ax.set_xticks(sorted({x for c in curves.values() for x in c}))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (held out)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def first_error_histogram(models: dict[str, dict[int, dict[int, int]]], path, title: str) -> None:
    """One panel per model, stacked bars per difficulty: how many chains first go wrong at step 1, 2, ..."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), sharey=True, squeeze=False)
    for ax, (name, counts) in zip(axes[0], models.items()):
        positions = sorted({i for c in counts.values() for i in c})
        bottom = [0] * len(positions)
        for difficulty, by_step in sorted(counts.items()):
            heights = [by_step.get(i, 0) for i in positions]
            ax.bar([i + 1 for i in positions], heights, bottom=bottom, label=f"{difficulty} digits")
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xlabel("step of the first error (1 = first step)")
        ax.set_title(f"{name}: {sum(map(sum, (c.values() for c in counts.values())))} chains with an error")
        if counts:
            ax.legend(fontsize="small")
    axes[0][0].set_ylabel("generated chains")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
