"""Figures of the reward-model run: score distributions, PRM reliability, the reward-hacking curve."""
from __future__ import annotations

from posttrain.report.plots import plt, save_figure


def reward_histograms(solutions, scores: dict[str, list[float]], path) -> None:
    """Each scorer's score (`scores`: its name -> a score per solution) of held-out solutions, correct vs
    incorrect, side by side."""
    fig, axes = plt.subplots(1, len(scores), figsize=(4.8 * len(scores), 3.6), squeeze=False)
    for ax, (title, values) in zip(axes[0], scores.items()):
        for label, color in ((True, "tab:green"), (False, "tab:red")):
            ax.hist([v for v, s in zip(values, solutions) if s.correct == label], bins=30, alpha=0.6, color=color,
                    label="correct" if label else "incorrect")
        ax.set_title(f"{title} of held-out solutions")
        ax.set_xlabel(title)
        ax.legend()
    axes[0][0].set_ylabel("solutions")
    fig.tight_layout()
    save_figure(fig, path)


def reliability_plot(table: dict, path, title: str = "PRM step probabilities: reliability") -> None:
    """Observed accuracy against mean predicted probability per bin (evaluation.calibration's table)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    bins = table["bins"]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=f"ECE {table['ece']:.3f}")
    for b in bins:
        ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("predicted P(step is right)")
    ax.set_ylabel("fraction of steps right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def hacking_plot(hacking: dict, path) -> None:
    """Best-of-N against the proxy and the clean ORM: selected reward and verified accuracy vs N."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for name, color in (("proxy", "tab:red"), ("orm", "tab:blue")):
        curve = hacking[name]["curve"]
        ns = [c["n"] for c in curve]
        left.plot(ns, [c["reward"] for c in curve], "o-", color=color, label=name)
        right.plot(ns, [c["accuracy"] for c in curve], "o-", color=color, label=name)
        if hacking[name]["detected_at_n"]:
            right.axvline(hacking[name]["detected_at_n"], color=color, linestyle=":", label=f"{name}: detector fires")
    for ax, ylabel in ((left, "reward of the selected solution"), (right, "verified accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (best-of-N)")
        ax.set_ylabel(ylabel)
        ax.legend()
    left.set_title("each model's own reward rises with N")
    right.set_title("what the verifier says")
    fig.tight_layout()
    save_figure(fig, path)
