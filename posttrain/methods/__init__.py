"""The methods, in the survey's taxonomy: fine-tuning, reinforcement learning, test-time scaling.

Each method is one module exposing `CONFIG` (its dataclass), `QUICK` (overrides for a smoke-sized
run), optionally `PRESETS` (overrides for a named model, e.g. the settings a 135M-parameter chat model
needs where the defaults are the embedded model's) and `run(cfg, resume=False) -> summary`.

The defaults are the embedded world's: a 0.9M-parameter model and the stages built from it. A user's
model (a folder or hub id) gets, in their place, the module's optional `USER_DEFAULTS` (with a user's
model or `--data`: e.g. lora's one adapter instead of its rank sweep) and `LARGE_MODEL` (with a user's
model over LARGE_MODEL_PARAMS parameters: TRL's learning rates), each only for keys the YAML file, the
preset and the command line leave unset.

GRPO's named variants (rloo, reinforce-pp, dapo, gspo) are thin modules of data: a GRPOConfig subclass
holding the method's published settings as its defaults and its name (`METHOD`), GRPO's QUICK and PRESETS,
and `run = grpo.run`, which names the run, its summary and plots after the config's METHOD. Every key of the
variant stays a GRPO key a user can set; its steps, prompts and generations stay GRPO's (equal samples).
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
    module: str
    data: str = ""  # the records its --data file holds ("": no --data, the method needs the world)

    def load(self):
        return importlib.import_module(self.module)

    def quick_overrides(self) -> list[str]:
        """The module's `QUICK` settings as `key=value` overrides (what `--quick` adds)."""
        return [f"{k}={v}" for k, v in self.load().QUICK.items()]

    def preset_overrides(self, model: str | None) -> list[str]:
        """The module's `PRESETS[model]` settings as `key=value` overrides (none for other models)."""
        preset = getattr(self.load(), "PRESETS", {}).get(model, {})
        return [f"{k}={v}" for k, v in preset.items()]

    def user_defaults(self, model: str, data: str | None) -> dict:
        """The module's `USER_DEFAULTS` when `model` is a user's model or `data` a user's records, else none."""
        return dict(getattr(self.load(), "USER_DEFAULTS", {})) if data or is_users_model(model) else {}

    def large_model_defaults(self, model: str) -> tuple[int, dict]:
        """(parameters, the module's `LARGE_MODEL`) for a user's model over LARGE_MODEL_PARAMS parameters (counted
        from its config, no weights loaded), else (0, {}): a method without them never reads the model, and
        a model whose config cannot be read gets none (--show-config still works offline)."""
        large = getattr(self.load(), "LARGE_MODEL", {})
        if not large or not is_users_model(model):
            return 0, {}
        from posttrain.errors import UserError
        from posttrain.models import parameter_count

        try:
            params = parameter_count(model)
        except UserError:
            return 0, {}  # not found (or offline): the run fails where it loads the model, with the reason
        return (params, dict(large)) if params > LARGE_MODEL_PARAMS else (0, {})


# Above this many parameters a user's model trains with TRL's defaults (the module's LARGE_MODEL): the
# embedded defaults are tuned for a model of about a million parameters, and a learning rate of 1e-3 on
# a model of a hundred million wrecks what it knew in a few steps.
LARGE_MODEL_PARAMS = 50_000_000


def is_users_model(name: str) -> bool:
    """True for a model the user brings (a folder or hub id); False for the embedded names (`posttrain:*`) and
    the shared stages built from them (`sft-policy[-quick]`), whose defaults and presets are the modules' own."""
    from posttrain.models import EMBEDDED_PREFIX
    from posttrain.rollouts import POLICIES

    return not name.startswith(EMBEDDED_PREFIX) and name not in POLICIES


SFT_RECORDS = "prompt/completion (or messages) records"
PREFERENCE_RECORDS = "prompt/chosen/rejected records"
UNPAIRED_RECORDS = "prompt/completion/label records (label true: desirable, false: undesirable)"
ANSWER_RECORDS = "prompt/answer records (answers compared by value)"

METHODS = {m.name: m for m in [
    Method("sft", "fine-tuning", "supervised fine-tuning, with forgetting probes, L2-SP and replay",
           "posttrain.methods.finetuning.sft", SFT_RECORDS),
    Method("lora", "fine-tuning", "low-rank adaptation", "posttrain.methods.finetuning.lora", SFT_RECORDS),
    Method("cot-ft", "fine-tuning", "chain-of-thought fine-tuning vs direct answers", "posttrain.methods.finetuning.cot"),
    Method("instruction", "fine-tuning", "multi-task instruction tuning",
           "posttrain.methods.finetuning.instruction"),
    Method("distill", "fine-tuning", "knowledge distillation into a smaller student",
           "posttrain.methods.finetuning.distill", SFT_RECORDS),
    Method("reward", "rl", "outcome and process reward models", "posttrain.methods.rl.reward_model",
           PREFERENCE_RECORDS + " (trains an outcome reward model on them)"),
    Method("dpo", "rl", "direct preference optimisation", "posttrain.methods.rl.dpo", PREFERENCE_RECORDS),
    Method("kto", "rl", "Kahneman-Tversky optimisation on unpaired labelled completions", "posttrain.methods.rl.kto",
           UNPAIRED_RECORDS),
    Method("orpo", "rl", "odds ratio preference optimisation, without a reference model", "posttrain.methods.rl.orpo",
           PREFERENCE_RECORDS),
    Method("ppo", "rl", "proximal policy optimisation", "posttrain.methods.rl.ppo", ANSWER_RECORDS),
    Method("grpo", "rl", "group relative policy optimisation", "posttrain.methods.rl.grpo", ANSWER_RECORDS),
    Method("rloo", "rl", "REINFORCE leave-one-out: GRPO with the other completions' mean as baseline",
           "posttrain.methods.rl.rloo", ANSWER_RECORDS),
    Method("reinforce-pp", "rl", "REINFORCE++: GRPO with rewards normalised over the whole batch",
           "posttrain.methods.rl.reinforce_pp", ANSWER_RECORDS),
    Method("dapo", "rl", "DAPO: clip-higher, dynamic sampling, token-level loss, overlong shaping",
           "posttrain.methods.rl.dapo", ANSWER_RECORDS),
    Method("gspo", "rl", "group sequence policy optimisation: one clipped ratio per completion",
           "posttrain.methods.rl.gspo", ANSWER_RECORDS),
    Method("expert-iteration", "rl", "expert iteration: fine-tuning on the policy's own verified samples",
           "posttrain.methods.rl.expert_iteration", ANSWER_RECORDS),
    Method("online-dpo", "rl", "online DPO on pairs of the current policy's verifier-labelled samples",
           "posttrain.methods.rl.online_dpo", ANSWER_RECORDS),
    Method("best-of-n", "test-time", "best-of-N sampling with reward-model selection",
           "posttrain.methods.test_time.best_of_n", ANSWER_RECORDS),
    Method("self-consistency", "test-time", "majority vote over sampled chains of thought",
           "posttrain.methods.test_time.self_consistency", ANSWER_RECORDS),
    Method("cot-prompt", "test-time", "chain-of-thought prompting", "posttrain.methods.test_time.cot_prompting"),
    Method("tree-search", "test-time", "step-level beam search with a process reward model", "posttrain.methods.test_time.tree_search"),
]}


def methods_overview() -> str:
    """A plain-text list of every method by category."""
    lines = []
    for category in CATEGORIES:
        lines.append(f"{category}:")
        for m in METHODS.values():
            if m.category == category:
                lines.append(f"  {m.name:<17} {m.title}")
    return "\n".join(lines)
