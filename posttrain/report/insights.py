"""The key insights the original lab promised, each stated with the number that shows it.

Every function reads one method's summary and returns a sentence, or None when the run did not
measure what the sentence needs; a missing measurement yields no sentence rather than a guess.
"""
from __future__ import annotations


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def fine_tuning_tradeoff(summaries: dict) -> str | None:
    """Adaptation vs forgetting: the target task's gain against the worst old-skill drop."""
    s = summaries.get("sft")
    forgetting = (s or {}).get("metrics", {}).get("forgetting")
    if not s or not forgetting:
        return None
    plain = forgetting.get("plain", forgetting)  # one dict per variant, or per skill for a single run
    drops = plain.get("drop", {}) if "drop" in plain and isinstance(plain["drop"], dict) else {
        k: v["drop"] for k, v in plain.items() if isinstance(v, dict) and "drop" in v}
    if not drops:
        return None
    worst = max(drops, key=drops.get)
    return (f"Fine-tuning trade-off: SFT raised held-out accuracy on the target task from "
            f"{_fmt(s['baseline']['accuracy'])} to {_fmt(s['metrics']['accuracy'])}, while accuracy on the old "
            f"skill '{worst}' fell by {_fmt(drops[worst])}.")


def test_time_scaling(summaries: dict) -> str | None:
    s = summaries.get("best-of-n")
    if not s:
        return None
    return (f"Scaling test-time compute: best-of-N selection took accuracy from {_fmt(s['baseline']['accuracy'])} "
            f"(greedy) to {_fmt(s['metrics']['accuracy'])} at its headline N.")


def generic(name: str, summary: dict) -> str | None:
    before, after = summary.get("baseline", {}).get("accuracy"), summary.get("metrics", {}).get("accuracy")
    if before is None or after is None:
        return None
    return f"{name}: held-out accuracy {_fmt(before)} -> {_fmt(after)} ({after - before:+.3f})."


SPECIFIC = {"sft": fine_tuning_tradeoff, "best-of-n": test_time_scaling}


def insights(summaries: dict) -> list[str]:
    """One sentence per method that ran: its specific insight where one exists, else its accuracy change."""
    sentences = []
    for name, summary in summaries.items():
        text = SPECIFIC[name](summaries) if name in SPECIFIC else None
        text = text or generic(name, summary)
        if text:
            sentences.append(text)
    return sentences
