"""Figures of the preference and RL methods: the reward-KL frontier, DPO's beta sweep and the policy-gradient
family at equal samples.

All read only what the runs wrote: each DPO/PPO/GRPO summary.json keeps `metrics.frontier`, a list of
{step, accuracy, kl} measured on held-out problems during the run (step 0 is the start); the on-policy runs'
points also hold `samples`, the completions sampled for training by then.
"""
from __future__ import annotations

from pathlib import Path

from posttrain.io import read_json
from posttrain.report.plots import plt, save_figure

COLOURS = {"dpo": "tab:blue", "ppo": "tab:orange", "grpo": "tab:green", "rloo": "tab:red",
           "reinforce-pp": "tab:purple", "dapo": "tab:brown", "gspo": "tab:pink"}
# The policy-gradient family: GRPO, its named variants and PPO, compared at equal completions sampled.
PG_FAMILY = ("grpo", "rloo", "reinforce-pp", "dapo", "gspo", "ppo")
PG_FAMILY_PLOT = "pg_family.png"


def reward_kl_frontier(summaries: dict[str, dict], path) -> None:
    """Held-out accuracy against KL(pi || ref) for each method, one line per run, on one figure.

    The DPO paper's Fig. 2 (left) draws reward against KL the same way: a method is better when its
    curve reaches higher accuracy for the same distance from the reference policy.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, summary in summaries.items():
        points = sorted(summary["metrics"]["frontier"], key=lambda p: p["step"])  # each a held-out measurement
        ax.plot([p["kl"] for p in points], [p["accuracy"] for p in points], "o-", color=COLOURS.get(method),
                label=f"{method.upper()} ({points[0]['accuracy']:.2f} -> {points[-1]['accuracy']:.2f})")
    first = next(iter(summaries.values()), {}).get("config", {})
    digits = "/".join(map(str, first.get("difficulties", []))) or "?"
    ax.set_xlabel(f"KL(policy || the policy it started from, {first.get('model', '?')}), nats per completion")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"Reward-KL frontier on {digits}-digit addition")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def beta_sweep_plot(points: list[dict], path) -> None:
    """DPO's beta against held-out accuracy (left axis) and KL to the reference (right axis)."""
    points = sorted(points, key=lambda p: p["beta"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    betas = [p["beta"] for p in points]
    ax.plot(betas, [p["accuracy"] for p in points], "o-", color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("beta")
    ax.set_ylabel("held-out accuracy", color="tab:blue")
    twin = ax.twinx()
    twin.plot(betas, [p["kl"] for p in points], "s--", color="tab:red")
    twin.set_ylabel("KL to reference (nats)", color="tab:red")
    ax.set_title("DPO beta sweep: a smaller beta lets the policy move further")
    fig.tight_layout()
    save_figure(fig, path)


def draw_frontier(out: Path) -> None:
    """Write `<out>/reward_kl_frontier.png`: this run's held-out accuracy against its KL to the start. The
    methods side by side are the report's (`draw_frontiers`), from the runs it is given."""
    this = read_json(Path(out) / "summary.json")
    reward_kl_frontier({this["method"]: this}, Path(out) / "reward_kl_frontier.png")


def draw_frontiers(summaries: dict[str, dict], folder: Path) -> Path | None:
    """`<folder>/reward_kl_frontier.png` with every run among `summaries` that measured a frontier, when two or
    more did; its path, else None."""
    runs = {name: s for name, s in summaries.items() if s.get("metrics", {}).get("frontier")}
    if len(runs) < 2:
        return None
    reward_kl_frontier(runs, Path(folder) / "reward_kl_frontier.png")
    return Path(folder) / "reward_kl_frontier.png"


def family_curves(summaries: dict[str, dict]) -> dict[str, list[tuple[int, float]]]:
    """method -> its held-out (samples drawn, accuracy) points in order, for each run of the policy-gradient
    family whose frontier counts samples, in PG_FAMILY's order."""
    curves = {}
    for summary in summaries.values():
        method, points = summary.get("method"), summary.get("metrics", {}).get("frontier", [])
        counted = sorted((p["samples"], p["accuracy"]) for p in points if p.get("samples") is not None)
        if method in PG_FAMILY and counted:
            curves[method] = counted
    return {m: curves[m] for m in PG_FAMILY if m in curves}


def pg_family_plot(curves: dict[str, list[tuple[int, float]]], path) -> None:
    """Held-out accuracy against completions sampled for training, one line per method of the family: at equal
    samples, the higher line learned more from what it drew."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, points in curves.items():
        samples, accuracy = zip(*points)
        ax.plot(samples, accuracy, "o-", color=COLOURS.get(method),
                label=f"{method} ({accuracy[0]:.2f} -> {accuracy[-1]:.2f}, {samples[-1]:,} samples)")
    ax.set_xlabel("completions sampled for training")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("The policy-gradient family at equal samples")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def draw_pg_family(summaries: dict[str, dict], folder: Path) -> Path | None:
    """`<folder>/pg_family.png` when two or more of the family's runs counted their samples; its path, else None."""
    curves = family_curves(summaries)
    if len(curves) < 2:
        return None
    pg_family_plot(curves, Path(folder) / PG_FAMILY_PLOT)
    return Path(folder) / PG_FAMILY_PLOT
