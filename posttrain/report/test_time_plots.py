"""Figures of the test-time scaling runs: accuracy and cost against N, accuracy per prompt style, reliability."""
from __future__ import annotations

from posttrain.report.plots import plt, save_figure

COLORS = {"orm": "tab:blue", "prm": "tab:green", "prm-ms": "tab:olive", "majority": "tab:orange", "oracle": "black", "tree search": "tab:purple"}


def accuracy_vs_n(ns: list[int], curves: dict[str, list[float]], greedy: float, path, title: str) -> None:
    """Accuracy against N (log scale), one curve per selector, the greedy accuracy as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in curves.items():
        ax.plot(ns, values, marker="o", color=COLORS.get(name), label=name, linestyle="--" if name == "oracle" else "-")
    ax.axhline(greedy, color="grey", linestyle=":", label=f"greedy ({greedy:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def cost_vs_n(cost: dict, path) -> None:
    """Generated tokens and sampling seconds per problem against N."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(cost["n"], cost["generated_tokens_per_problem"], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("generated tokens per problem", color="tab:blue")
    twin = ax.twinx()
    twin.plot(cost["n"], cost["sampling_seconds_per_problem"], "s--", color="tab:red")
    twin.set_yscale("log")
    twin.set_ylabel("sampling seconds per problem", color="tab:red")
    ax.set_title("The price of N")
    fig.tight_layout()
    save_figure(fig, path)


def style_bars(results: dict[str, dict[str, float]], path, title: str) -> None:
    """Accuracy per prompt style, one group of bars per model."""
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    models = list(results)
    styles = list(next(iter(results.values())))
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        xs = [s + (m - (len(models) - 1) / 2) * width for s in range(len(styles))]
        ax.bar(xs, [results[model][style] for style in styles], width=width, label=model)
    ax.set_xticks(range(len(styles)), styles)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def reliability(tables: dict[str, dict], path, title: str) -> None:
    """Observed accuracy against confidence per bin, one curve per confidence measure (with its ECE)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for name, table in tables.items():
        bins = table["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=f"{name} (ECE {table['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("fraction right")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
