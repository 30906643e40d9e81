"""Chain-of-thought prompting: the same model asked four ways (Wei et al. 2022; Kojima et al. 2022).

    zero-shot direct   Q: 347+285\\nA:                         the model must answer at once
    few-shot direct    <shots direct examples, EOS-separated> Q: 347+285\\nA:
    few-shot CoT       <shots CoT examples, EOS-separated> Q: 347+285\\n
    zero-shot CoT      Q: 347+285\\nLet's think step by step.\\n      the trigger, no examples

Exemplars are solved problems of the world's train split, joined with the tokenizer's EOS text: the
pretraining corpus chains examples exactly so, and a model continues such a prompt with one answer
and EOS. Each style runs greedily on the base model (3-digit problems) and on a fine-tuned model (the
shared CoT SFT policy, on the 4-digit problems it was trained for: it fails 3-digit problems in every
style); reported per style: accuracy, and the step accuracy of any reasoning written.
For each model's few-shot CoT answers, two confidence estimates: the mean token probability of the
answer (teacher-forced on the greedy completion) and the agreement of `samples` temperature-1 samples
with the greedy answer; reliability plots and ECE.

The headline (metrics.accuracy) is the base model's few-shot CoT accuracy; the baseline is the base
model's few-shot direct accuracy (the comparison of Wei et al.'s Figure 4), on 3-digit addition, the
difficulty the base model reaches only by reasoning.

    posttrain cot-prompt --output-dir runs/cot-prompt
"""
from __future__ import annotations

import dataclasses
import time

import torch

from posttrain.data import encode_prompt
from posttrain.errors import UserError
from posttrain.evaluation import calibration, majority_vote, max_new_tokens_for
from posttrain.generation import generate, token_logprobs
from posttrain.methods.common import policy_path, prepare_output, write_summary
from posttrain.models import DEFAULT_MODEL, load_model
from posttrain.report.test_time_plots import reliability, style_bars
from posttrain.training import TrainResult
from posttrain.world import COT_TRIGGER, MAIN_SKILL, check_steps, extract_answer, render, sample_problems, verify

STYLES = ("zero-shot direct", "few-shot direct", "few-shot CoT", "zero-shot CoT")


@dataclasses.dataclass
class CoTPromptConfig:
    model: str = DEFAULT_MODEL  # the base model
    finetuned: str = "sft-policy"  # the fine-tuned model: sft-policy (shared CoT SFT model), a folder, or "" to skip
    output_dir: str = "runs/cot-prompt"  # where summary.json and the plots go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [3])  # digits of the base model's problems
    finetuned_difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # the fine-tuned model's (its task)
    # held-out test problems per model: the base model's few-shot CoT gain is about a tenth of them, and
    # with fewer problems one draw's gain is mostly noise
    problems: int = 200
    # exemplars in the few-shot prompts; the prompt must fit the base model's 256-token pretraining window
    # (at 3 digits each further shot leaves less room, and four shots no longer fit)
    shots: int = 2
    samples: int = 5  # temperature-1 samples per problem for the agreement confidence
    seed: int = 0  # seeds the test problems and the sampling

    def validate(self) -> None:
        if self.problems < 1 or self.shots < 1 or self.samples < 2:
            raise UserError("problems and shots must be >= 1, samples >= 2")


CONFIG = CoTPromptConfig
QUICK = {"model": "posttrain:tiny-quick", "finetuned": "sft-policy-quick", "difficulties": "2", "finetuned_difficulties": "2",
         "problems": 30, "samples": 3}
# A user's model: no fine-tuned comparison (the default one is the embedded world's shared policy, built on first
# use); finetuned=FOLDER compares one.
USER_DEFAULTS = {"finetuned": ""}


def style_prompts(problem, exemplars, eos: str) -> dict[str, tuple[str, str]]:
    """{style: (prompt, prefix)}: the model continues `prompt`; `prefix` + its continuation is the answer text."""
    question = render(problem, "cot")[0]  # "Q: 347+285\n", the same line in every format
    shots = lambda fmt: "".join(p + c + eos for p, c in (render(e, fmt) for e in exemplars))  # noqa: E731
    return {
        "zero-shot direct": (question + "A:", "A:"),
        "few-shot direct": (shots("direct") + question + "A:", "A:"),
        "few-shot CoT": (shots("cot") + question, ""),
        "zero-shot CoT": (question + COT_TRIGGER + "\n", COT_TRIGGER + "\n"),
    }


def answer_confidence(model, tokenizer, prompt: str, text: str) -> float | None:
    """Mean probability of the answer's tokens (those covering the `A:` line's value) given what came before."""
    start = text.rfind("A:")
    answer = extract_answer(text[start:]) if start >= 0 else None
    if not answer:
        return None
    value_start = text.index(answer, start)
    tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = prompt_ids + tokens["input_ids"]
    value_end = value_start + len(answer)
    picked = [len(prompt_ids) + i for i, (s, e) in enumerate(tokens["offset_mapping"]) if e > value_start and s < value_end]
    labels = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        logps = token_logprobs(model(input_ids=labels).logits, labels)[0]  # (T-1,): position t scores token t+1
    return float(torch.stack([logps[i - 1] for i in picked]).exp().mean())


def run_style(model, tokenizer, problems, prompts: list[str], prefixes: list[str], budget: int) -> dict:
    """Greedy completions of one prompt style: accuracy, step accuracy and the texts."""
    samples = generate(model, tokenizer, prompts, max_new_tokens=budget)
    texts = [prefix + t for prefix, t in zip(prefixes, samples.texts)]
    correct = [verify(q, t, p.answer) for q, t, p in zip(prompts, texts, problems)]
    steps = [check_steps(p, t) for p, t in zip(problems, texts)]
    written = sum(map(len, steps))
    return {"accuracy": sum(correct) / len(correct), "step_accuracy": sum(map(sum, steps)) / written if written else None,
            "steps_written": written, "generated_tokens": samples.num_tokens,
            "_texts": texts, "_correct": correct}


def confidences(model, tokenizer, problems, prompts: list[str], style: dict, cfg: CoTPromptConfig, budget: int) -> dict:
    """Token-probability and sample-agreement confidence of one style's greedy answers, with reliability tables."""
    token_conf = [answer_confidence(model, tokenizer, q, t) for q, t in zip(prompts, style["_texts"])]
    sampled = generate(model, tokenizer, prompts, max_new_tokens=budget, temperature=1.0, num_samples=cfg.samples, seed=cfg.seed)
    greedy = [extract_answer(t) for t in style["_texts"]]
    agreement = [sum(extract_answer(t) == g for t in sampled.texts[i * cfg.samples : (i + 1) * cfg.samples]) / cfg.samples
                 for i, g in enumerate(greedy)]
    majority = [majority_vote([extract_answer(t) for t in sampled.texts[i * cfg.samples : (i + 1) * cfg.samples]])[0]
                for i in range(len(problems))]
    right = style["_correct"]
    return {
        "token_probability": calibration([c or 0.0 for c in token_conf], right),
        "sample_agreement": calibration(agreement, right),
        "sampled_majority_accuracy": sum(m == p.answer for m, p in zip(majority, problems)) / len(problems),
    }


def evaluate_model(name: str, difficulties: list[int], cfg: CoTPromptConfig) -> tuple[dict, object]:
    """(every style's results and the confidence of few-shot CoT, the model) for one model."""
    problems = sample_problems(MAIN_SKILL, difficulties, cfg.problems, "test", cfg.seed)
    exemplars = sample_problems(MAIN_SKILL, difficulties, cfg.shots, "train", cfg.seed)
    model, tokenizer = load_model(name)
    budget = max_new_tokens_for(tokenizer, problems, "cot")
    by_style = {}
    for style in STYLES:
        prompts, prefixes = zip(*(style_prompts(p, exemplars, tokenizer.eos_token)[style] for p in problems))
        by_style[style] = run_style(model, tokenizer, problems, list(prompts), list(prefixes), budget)
    headline_prompts = [style_prompts(p, exemplars, tokenizer.eos_token)["few-shot CoT"][0] for p in problems]
    conf = confidences(model, tokenizer, problems, headline_prompts, by_style["few-shot CoT"], cfg, budget)
    clean = {s: {k: v for k, v in r.items() if not k.startswith("_")} for s, r in by_style.items()}
    return {"by_style": clean, "confidence": conf, "difficulties": difficulties,
            "shots": [render(e, "cot")[0].strip() for e in exemplars]}, model


def run(cfg: CoTPromptConfig, resume: bool = False) -> dict:
    del resume  # nothing to resume: no training
    start = time.perf_counter()
    out = prepare_output(cfg.output_dir, resume=False)
    models = {"base": (cfg.model, cfg.difficulties),
              **({"fine-tuned": (policy_path(cfg.finetuned), cfg.finetuned_difficulties)} if cfg.finetuned else {})}
    results, base_model = {}, None
    for label, (name, difficulties) in models.items():
        results[label], model = evaluate_model(name, difficulties, cfg)
        base_model = base_model or model  # the summary's parameter count is the base model's

    style_bars({f"{label} ({r['difficulties']} digits)": {s: r["by_style"][s]["accuracy"] for s in STYLES}
                for label, r in results.items()}, out / "accuracy_by_style.png", "Prompt styles on addition (greedy)")
    reliability({f"{label}: {kind.replace('_', ' ')}": r["confidence"][kind] for label, r in results.items()
                 for kind in ("token_probability", "sample_agreement")},
                out / "confidence_reliability.png", "Few-shot CoT: confidence vs accuracy")
    base = results["base"]["by_style"]
    metrics = {"accuracy": base["few-shot CoT"]["accuracy"], "headline": "base model, few-shot CoT",
               "cot_gain_over_direct": base["few-shot CoT"]["accuracy"] - base["few-shot direct"]["accuracy"],
               "models": {label: {"model": models[label][0], "difficulties": r["difficulties"], "shots": r["shots"],
                                  "by_style": r["by_style"],
                                  "ece": {k: r["confidence"][k]["ece"] for k in ("token_probability", "sample_agreement")},
                                  "sampled_majority_accuracy": r["confidence"]["sampled_majority_accuracy"]}
                          for label, r in results.items()}}
    baseline = {**base["few-shot direct"], "headline": "base model, few-shot direct"}
    elapsed = time.perf_counter() - start
    tokens = sum(s["generated_tokens"] for r in results.values() for s in r["by_style"].values())
    return write_summary(out, "cot-prompt", cfg, metrics, baseline, base_model, TrainResult([], {}, elapsed, tokens / elapsed))
