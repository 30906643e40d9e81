"""The key insights the original lab promised, each stated with the number that shows it.

Every function reads the run's summaries and returns a sentence, or None when the run did not
measure what the sentence needs: a missing measurement yields no sentence rather than a guess.
The wording follows the numbers (a method that did not help is said not to have helped).
"""
from __future__ import annotations


def _f(x: float) -> str:
    return f"{x:.2f}"


def _change(before: float, after: float) -> str:
    return f"{_f(before)} -> {_f(after)} ({100 * (after - before):+.0f} points)"


def forgetting(s: dict) -> str | None:
    """Adaptation vs forgetting: plain SFT's old-skill drop and what the best mitigation kept."""
    variants, best = s["metrics"].get("forgetting"), s["metrics"].get("best_mitigation")
    if not variants or "plain" not in variants:
        return None
    plain = variants["plain"]
    text = (f"Adaptation vs forgetting: plain SFT took the target task to {_f(plain['target_accuracy'])} while "
            f"mean old-skill accuracy fell by {_f(plain['mean_drop'])}")
    if best:
        kept = variants[best["variant"]]
        text += (f"; {best['variant']} kept the target at {_f(kept['target_accuracy'])} with a mean old-skill drop "
                 f"of {_f(kept['mean_drop'])}")
    return text + "."


def lora(s: dict) -> str | None:
    m = s["metrics"]
    if "full_ft" not in m:
        return None
    compared = (f"{_f(m['accuracy'])} vs {_f(m['full_ft']['accuracy'])} for full fine-tuning on the same data and steps"
                if m["full_ft"] else _change(s["baseline"]["accuracy"], m["accuracy"]))  # full_ft=false: no comparison
    return (f"LoRA r={s['config']['r']}: {100 * m['trainable_fraction']:.1f}% of the parameters trained, held-out "
            f"accuracy {compared}; merged and adapter logits differ by at most {m['merge_max_abs_diff']:.1e}.")


def cot_ft(s: dict) -> str | None:
    m = s["metrics"]
    if "direct" not in m:
        return None
    hardest = max(m["by_difficulty"], key=int)
    return (f"Chain-of-thought fine-tuning: on the same problems and steps, {hardest}-digit accuracy "
            f"{_f(m['by_difficulty'][hardest])} with worked steps vs {_f(m['direct']['by_difficulty'][hardest])} "
            f"with direct answers.")


def instruction(s: dict) -> str | None:
    m, b = s["metrics"], s["baseline"]
    if "seen" not in m:
        return None
    wordings = (f", new sentences of known words {_change(b['held_out_wordings'], m['held_out_wordings'])}"
                if "held_out_wordings" in m else "")  # summaries from before held-out wordings existed
    return (f"Instruction tuning: seen phrasings {_change(b['seen'], m['seen'])}{wordings}, held-out styles "
            f"(words only pretraining used) {_change(b['held_out_styles'], m['held_out_styles'])}, held-out "
            f"skill/phrasing combination {_change(b['held_out_combination'], m['held_out_combination'])}.")


def distill(s: dict) -> str | None:
    m = s["metrics"]
    students = m.get("students")
    if not students:
        return None
    gaps = m.get("gap_closed_by_student") or {"soft_kd": m.get("gap_closed")}  # runs before on-policy KD had one
    closed = " and ".join(f"{name} {100 * gaps[kind]:.0f}%" for kind, name in (("on_policy", "on-policy KD"),
                                                                            ("soft_kd", "soft targets"))
                          if gaps.get(kind) is not None)
    closed = f"; of the SFT student's gap to the teacher, {closed} closed" if closed else ""
    on_policy = f", on-policy KD {_f(students['on_policy']['accuracy'])}" if "on_policy" in students else ""
    return (f"Distillation into a student with {100 * m['student_to_teacher_params']:.0f}% of the teacher's parameters: "
            f"SFT {_f(students['sft']['accuracy'])}, sequence-level KD {_f(students['seq_kd']['accuracy'])}, "
            f"soft-target KD {_f(students['soft_kd']['accuracy'])}{on_policy}, teacher {_f(m['teacher']['accuracy'])}"
            f"{closed}.")


def reward(s: dict) -> str | None:
    m = s["metrics"]
    if m.get("prm_step_accuracy") is None and m.get("orm_auc") is not None:  # an ORM alone, on a chat model's replies
        return (f"An outcome reward model on the model's own held-out replies: pair accuracy "
                f"{_f(m['orm_pair_accuracy'])}, AUC {_f(m['orm_auc'])} (the model's own likelihood: "
                f"{_f(s['baseline']['accuracy'])}, AUC {_f(s['baseline'].get('auc'))}).")
    if m.get("prm_step_accuracy") is None:
        return None
    text = (f"Reward models on held-out policy samples: ORM pair accuracy {_f(m['orm_pair_accuracy'])} (the policy's "
            f"own likelihood: {_f(s['baseline']['accuracy'])}), PRM step accuracy {_f(m['prm_step_accuracy'])} "
            f"(always 'right': {_f(m['prm_step_label_mean'])}).")
    if m.get("prm_ms_step_accuracy") is not None:
        text += (f" The PRM on Math-Shepherd's Monte-Carlo labels, which need no step checker: step accuracy "
                 f"{_f(m['prm_ms_step_accuracy'])} against the checker (its training labels agree with the checker's "
                 f"on {_f(m.get('mc_label_agreement'))} of the steps).")
    hacking = m.get("hacking", {})
    if hacking:
        proxy, clean = hacking["proxy"], hacking["orm"]
        fired = lambda r: f"fires at N={r['detected_at_n']}" if r["detected_at_n"] else "stays silent"  # noqa: E731
        first, peak, top = proxy["curve"][0], max(proxy["curve"], key=lambda c: c["accuracy"]), proxy["curve"][-1]
        text += (f" Best-of-N against a length-biased proxy: verified accuracy {_f(first['accuracy'])} at N=1, "
                 f"{_f(peak['accuracy'])} at N={peak['n']}, {_f(top['accuracy'])} at N={top['n']} while the proxy reward "
                 f"keeps rising (to {_f(top['reward'])}); the over-optimisation detector {fired(proxy)} on the proxy "
                 f"and {fired(clean)} on the clean ORM.")
    return text


def policy_optimisation(name: str):
    def sentence(s: dict) -> str | None:
        m, b = s["metrics"], s["baseline"]
        if m.get("accuracy") is None or b.get("accuracy") is None:
            return None
        kl = f" at KL {m['kl']:.3f} nats from the policy it started from" if m.get("kl") is not None else ""
        drawn = f", {m['samples_drawn']:,} completions sampled" if m.get("samples_drawn") else ""
        return f"{name}: held-out accuracy {_change(b['accuracy'], m['accuracy'])}{kl}{drawn}."
    return sentence


def best_of_n(s: dict) -> str | None:
    m = s["metrics"]
    if "by_n" not in m:
        return None
    return (f"Test-time compute: {m['headline']} reaches {_f(m['accuracy'])} from {_f(s['baseline']['accuracy'])} greedy. "
            f"{m['ordering']['summary']}")


def self_consistency(s: dict) -> str | None:
    m = s["metrics"]
    return f"Self-consistency: {m['headline']} {_f(m['accuracy'])} vs greedy {_f(s['baseline']['accuracy'])}." \
        if "by_k" in m else None


def cot_prompt(s: dict) -> str | None:
    m = s["metrics"]
    if "cot_gain_over_direct" not in m:
        return None
    return (f"Chain-of-thought prompting on the base model: few-shot CoT {_f(m['accuracy'])} vs few-shot direct "
            f"{_f(s['baseline']['accuracy'])}.")


def tree_search(s: dict) -> str | None:
    m = s["metrics"]
    equal = m.get("best_of_n_equal_budget")
    if not equal:
        return None
    text = (f"Tree search ({m['headline']}): {_f(m['accuracy'])} at {m['generated_tokens_per_problem']:.0f} generated "
            f"tokens per problem, vs best-of-{equal['n']} with the same PRM at that budget {_f(equal['accuracy'])} "
            f"(greedy {_f(s['baseline']['accuracy'])}).")
    other = {k: r for k, r in m.get("by_prm", {}).items() if k != s.get("config", {}).get("prm", "prm")}
    for kind, r in other.items():
        name = "the Math-Shepherd-labelled PRM" if kind == "prm-ms" else "the checker-labelled PRM"
        text += (f" Guided by {name}: {_f(r['accuracy'])}, vs best-of-{r['best_of_n_equal_budget']['n']} with it "
                 f"{_f(r['best_of_n_equal_budget']['accuracy'])}.")
    return text


SPECIFIC = {"sft": forgetting, "lora": lora, "cot-ft": cot_ft, "instruction": instruction, "distill": distill,
            "reward": reward, "dpo": policy_optimisation("DPO"), "ppo": policy_optimisation("PPO"),
            "grpo": policy_optimisation("GRPO"), "rloo": policy_optimisation("RLOO"),
            "reinforce-pp": policy_optimisation("REINFORCE++"), "dapo": policy_optimisation("DAPO"),
            "gspo": policy_optimisation("GSPO"), "kto": policy_optimisation("KTO"),
            "orpo": policy_optimisation("ORPO"), "expert-iteration": policy_optimisation("Expert iteration"),
            "online-dpo": policy_optimisation("Online DPO"), "best-of-n": best_of_n,
            "self-consistency": self_consistency, "cot-prompt": cot_prompt, "tree-search": tree_search}


def generic(name: str, summary: dict) -> str | None:
    before, after = summary.get("baseline", {}).get("accuracy"), summary.get("metrics", {}).get("accuracy")
    if before is None or after is None:
        return None
    return f"{name}: held-out accuracy {_change(before, after)}."


def insights(summaries: dict) -> list[str]:
    """One sentence per method that ran: its specific insight where it measured one, else its accuracy change."""
    sentences = []
    for name, summary in summaries.items():
        text = SPECIFIC[name](summary) if name in SPECIFIC else None
        text = text or generic(name, summary)
        if text:
            sentences.append(text + elsewhere(summary))
    return sentences


def elsewhere(summary: dict) -> str:
    """What a chat model's run cost it outside the task (chat_world.GeneralProbe), where it measured that."""
    before, after = summary.get("baseline", {}).get("general_nll"), summary.get("metrics", {}).get("general_nll")
    if before is None or after is None:
        return ""
    return (f" Outside the task, the NLL per token of the start model's own replies went {before:.2f} -> {after:.2f}"
            f" ({'more' if after > before else 'no more'} surprised by what it used to say).")
