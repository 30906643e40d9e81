"""Figures of the LoRA run: the rank sweep and the adaptation magnitude of each layer over training."""
from __future__ import annotations

from posttrain.report.plots import plt, save_figure

# (key in a sweep row, panel title, scale applied to the value, log y axis)
SWEEP_PANELS = [
    ("accuracy", "held-out accuracy", 1.0, False),
    ("trainable_fraction", "trainable parameters (% of total)", 100.0, True),
    ("time_s", "training wall time (s)", 1.0, False),
    ("peak_memory_mb", "peak memory during training (MB)", 1.0, False),
]


def rank_sweep_panels(rows: list[dict], full: dict | None, path) -> None:
    """One panel per measure against LoRA rank (log2 axis); full fine-tuning as a dashed line."""
    fig, axes = plt.subplots(2, 2, figsize=(8.8, 6.0))
    ranks = [row["r"] for row in rows]
    for ax, (key, title, scale, log_y) in zip(axes.flat, SWEEP_PANELS):
        points = [(row["r"], row[key] * scale) for row in rows if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", color="tab:blue", label="LoRA")
        if full and full.get(key) is not None:
            ax.axhline(full[key] * scale, color="tab:red", linestyle="--", label="full fine-tuning")
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_title(title, fontsize=10)
    axes.flat[0].set_ylim(0, 1.02)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def adaptation_curves(steps: list[int], layers: dict[str, list[float]], path) -> None:
    """||(alpha/r) B A|| / ||W|| against step, one line per adapted layer: colour = projection, style = depth."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
    colours = {kind: plt.cm.tab10(i) for i, kind in enumerate(kinds)}
    depths = sorted({name.rsplit(".", 2)[0] for name in layers})
    styles = ["-", "--", ":", "-."]
    for name, values in layers.items():
        kind, depth = name.rsplit(".", 1)[-1], depths.index(name.rsplit(".", 2)[0])
        label = kind if depth == 0 else None  # one legend entry per projection
        ax.plot(steps, values, styles[depth % len(styles)], color=colours[kind], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("||(alpha/r) B A|| / ||W||")
    ax.set_title("LoRA adaptation magnitude per layer (line style: depth, shallow = solid)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
