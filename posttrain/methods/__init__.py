"""The methods, in the survey's taxonomy: fine-tuning, reinforcement learning, test-time scaling.

Each available method is one module exposing `CONFIG` (its dataclass), `QUICK` (overrides for a
smoke-sized run) and `run(cfg, resume=False) -> summary`. Methods not built yet are listed with
`module=None` so every front door can say so plainly instead of pretending.
"""
from __future__ import annotations

import dataclasses
import importlib

CATEGORIES = ("fine-tuning", "rl", "test-time")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    category: str
    title: str
    module: str | None  # None: not available in this version

    @property
    def available(self) -> bool:
        return self.module is not None

    def load(self):
        return importlib.import_module(self.module)


METHODS = {m.name: m for m in [
    Method("sft", "fine-tuning", "supervised fine-tuning, with forgetting probes, L2-SP and replay",
           "posttrain.methods.finetuning.sft"),
    Method("lora", "fine-tuning", "low-rank adaptation", "posttrain.methods.finetuning.lora"),
    Method("cot-ft", "fine-tuning", "chain-of-thought fine-tuning vs direct answers", None),
    Method("instruction", "fine-tuning", "multi-task instruction tuning", None),
    Method("distill", "fine-tuning", "knowledge distillation into a smaller student", None),
    Method("reward", "rl", "outcome and process reward models", None),
    Method("dpo", "rl", "direct preference optimisation", "posttrain.methods.rl.dpo"),
    Method("ppo", "rl", "proximal policy optimisation", "posttrain.methods.rl.ppo"),
    Method("grpo", "rl", "group relative policy optimisation", None),
    Method("best-of-n", "test-time", "best-of-N sampling with reward-model selection", None),
    Method("self-consistency", "test-time", "majority vote over sampled chains of thought", None),
    Method("cot-prompt", "test-time", "chain-of-thought prompting", None),
    Method("tree-search", "test-time", "step-level beam search with a process reward model", None),
]}


def methods_overview() -> str:
    """A plain-text list of every method by category, marking those not available yet."""
    lines = []
    for category in CATEGORIES:
        lines.append(f"{category}:")
        for m in METHODS.values():
            if m.category == category:
                status = "" if m.available else "   [not available yet]"
                lines.append(f"  {m.name:<17} {m.title}{status}")
    return "\n".join(lines)
