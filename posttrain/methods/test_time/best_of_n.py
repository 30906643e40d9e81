"""Best-of-N: sample N solutions, keep the one a selector likes best (Cobbe et al. 2021; Lightman et al. 2023).

    for each held-out problem: k = max_n samples from the policy (one shared prompt prefill)
    selectors   ORM     the sample with the highest outcome reward
                PRM     the sample with the highest PRM score (min or product of step probabilities)
                majority  the most common final answer (ties: the first seen)
                oracle  any sample right (pass@N): the ceiling every selector sits under
    accuracy at N = 1, 2, 4, ..., max_n, each the expectation over all N-subsets of the k samples
    (evaluation.best_of_n, pass_at_k; majority over `subsets` random N-subsets), so one set of
    samples gives a smooth curve instead of one noisy draw per N

The reward models are those of `posttrain reward` on the same policy (the cached stage, trained once),
or any folder holding its orm/ and prm/, or either (`reward_models=DIR`; `posttrain reward --data`
trains an ORM only). Cost against N: generated tokens and
sampling seconds per problem grow linearly with N (sampling k once and sharing it out is the recorded
cost times N/k). The summary says, with numbers, whether PRM selection beats ORM selection and majority
voting as N grows, the ordering "Let's Verify Step by Step" reports, whichever way it comes out here.

With `--data`, the questions are the user's `{"prompt", "answer"}` records (the first `problems` of
them), their answers read as world/answers.py reads them.

Without a reward model (a model that is not the shared policy, and no `reward_models`) the run selects
by majority vote alone, beside the verifier's oracle (the answer matching self-consistency uses), and
says so: best-of-N's ceiling and the vote's share of it, instead of no curve at all.

    posttrain best-of-n --output-dir runs/best-of-n
    posttrain best-of-n --model ./my-policy reward_models=runs/reward
    posttrain best-of-n --model ./my-policy --data prompts.jsonl reward_models=runs/my-orm max_n=16
    posttrain best-of-n --model ./my-policy --data prompts.jsonl   # majority vote and the oracle only
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from posttrain.errors import UserError
from posttrain.evaluation import best_of_n, majority_at_n, pass_at_k
from posttrain.methods import METHODS
from posttrain.methods.common import policy_path, prepare_output, write_summary
from posttrain.methods.rl.reward_model import trained_reward_models
from posttrain.methods.test_time import greedy_baseline, held_out_questions, sample_solutions
from posttrain.models import load_model
from posttrain.records import read_prompts
from posttrain.report.test_time_plots import accuracy_vs_n, cost_vs_n
from posttrain.reward_models import load_reward_model
from posttrain.rollouts import POLICIES
from posttrain.training import TrainResult

REWARD_MODELS = ("orm", "prm", "prm-ms")  # prm-ms: the PRM on Math-Shepherd labels (`posttrain reward prm_labels=...`)


class NoRewardModels(UserError):
    """No reward model applies to this run: none given, none trained for the model."""

SELECTORS = (*REWARD_MODELS, "majority", "oracle")


@dataclasses.dataclass
class BestOfNConfig:
    model: str = "sft-policy"  # the policy that samples: sft-policy (shared CoT SFT model), a folder or hub id
    reward_models: str = ""  # folder with orm/ and/or prm/ from `posttrain reward` ("": the cached stage on the policy)
    data: str | None = None  # JSONL of prompt/answer records to answer (the first `problems`); default: world problems
    output_dir: str = "runs/best-of-n"  # where summary.json and the plots go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    problems: int = 40  # held-out test problems
    max_new_tokens: int = 256  # completion budget with data (world problems: their longest solution + 8)
    max_n: int = 64  # samples per problem; N runs over the powers of two up to it
    headline_n: int = 16  # the N of metrics.accuracy (with the better reward model there)
    temperature: float = 1.0  # sampling temperature
    subsets: int = 200  # random N-subsets per problem for majority voting's expectation
    seed: int = 0  # seeds the test problems and the sampling

    def validate(self) -> None:
        if self.max_n < 2 or self.max_n & (self.max_n - 1) or not 1 <= self.headline_n <= self.max_n:
            raise UserError(f"max_n must be a power of two >= 2 and headline_n in [1, max_n] "
                            f"(got {self.max_n}, {self.headline_n})")
        if self.headline_n & (self.headline_n - 1):
            raise UserError(f"headline_n must be a power of two, got {self.headline_n}")
        if self.problems < 1 or self.temperature <= 0:
            raise UserError("problems must be >= 1 and temperature > 0")


CONFIG = BestOfNConfig
# --quick: the 2-digit twin policy and its reward models.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "problems": 16, "max_n": 16, "headline_n": 8}
# The real pretrained chat model on 2-digit additions asked in words, selecting with the ORM `posttrain reward`
# trains on its own replies; 150 problems x 32 samples fit the real-model track's 15 minutes.
PRESETS = {"posttrain:smollm2-135m": {"difficulties": "2", "problems": 150, "max_n": 32, "headline_n": 16,
                                      "temperature": 0.7, "max_new_tokens": 32}}


def reward_model_dir(cfg) -> Path:
    """Where orm/ and prm/ are: the given folder, the cached reward stage of the shared policy, or that of a
    model `posttrain reward` has a preset for (an ORM on the model's own replies)."""
    if cfg.reward_models:
        return Path(cfg.reward_models)
    if cfg.model in POLICIES:
        return trained_reward_models(quick=POLICIES[cfg.model])
    if METHODS["reward"].preset_overrides(cfg.model):
        return trained_reward_models(model=cfg.model)
    raise NoRewardModels(f"model '{cfg.model}' is not the shared policy: give reward_models=DIR (a `posttrain reward` "
                         "output)")


def selector_curves(samples, scores: dict, ns: list[int], subsets: int, seed: int) -> dict:
    """Accuracy at each N for every selector (a reward model per entry of `scores`: its score of each
    sample, grouped per question; majority voting; the oracle), averaged over questions."""
    k = len(samples.texts[0])
    per_question = {kind: lambda i, n, s=s: best_of_n(s[i], samples.correct[i], n) for kind, s in scores.items()}
    per_question["majority"] = lambda i, n: majority_at_n(samples.answers[i], samples.references[i], n, subsets,
                                                          seed + i)
    per_question["oracle"] = lambda i, n: pass_at_k(k, int(sum(samples.correct[i])), n)
    P = len(samples.prompts)
    return {name: [sum(f(i, n) for i in range(P)) / P for n in ns] for name, f in per_question.items()}


def ordering(curves: dict, ns: list[int]) -> dict:
    """Where PRM selection beats ORM selection and majority voting, and the sentence that says so."""
    def wins(a: str, b: str) -> list[int]:
        return [n for n, x, y in zip(ns, curves[a], curves[b]) if x > y]

    last = ", ".join(f"{name.upper() if name in REWARD_MODELS else name} {round(curves[name][-1], 3)}"
                     for name in ("prm", "prm-ms", "orm", "majority", "oracle") if name in curves)
    if not all(kind in curves for kind in ("orm", "prm")):
        return {"summary": f"At N={ns[-1]}: {last}."}
    sentence = (f"At N={ns[-1]}: {last}. PRM beats ORM at N in {wins('prm', 'orm') or 'none'} and majority voting "
                f"at N in {wins('prm', 'majority') or 'none'}.")
    return {"prm_beats_orm_at": wins("prm", "orm"), "prm_beats_majority_at": wins("prm", "majority"), "summary": sentence}


def reward_model_kinds(rm_dir: Path) -> list[str]:
    """Which of orm/, prm/, prm-ms/ `rm_dir` holds (at least one)."""
    kinds = [kind for kind in REWARD_MODELS if (rm_dir / kind).is_dir()]
    if not kinds:
        raise UserError(f"'{rm_dir}' holds no orm/ or prm/ folder (expected the output folder of `posttrain reward`)")
    return kinds


def selecting_reward_models(cfg) -> tuple[Path | None, list[str]]:
    """(folder, kinds) of the reward models that select; (None, []) where none applies, said in one line:
    majority voting then selects, and the verifier's oracle is the ceiling."""
    try:
        rm_dir = reward_model_dir(cfg)
    except NoRewardModels:
        print(f"best-of-n: no reward model for '{cfg.model}' (give reward_models=DIR to select with one): "
              "selecting by majority vote, the verifier's answer matching as the oracle", flush=True)
        return None, []
    return rm_dir, reward_model_kinds(rm_dir)  # a folder without reward models fails before anything slow


def score_samples(rm_dir: Path, kinds: list[str], samples) -> dict:
    """Each reward model's (`rm_dir`/kind) score of every sample, grouped per question."""
    k, scores = len(samples.texts[0]), {}
    for kind in kinds:
        flat = load_reward_model(rm_dir / kind).score([q for q, ts in zip(samples.prompts, samples.texts) for _ in ts],
                                                      [t for ts in samples.texts for t in ts])
        scores[kind] = [flat[i * k : (i + 1) * k] for i in range(len(samples.prompts))]
    return scores


def run(cfg: BestOfNConfig, resume: bool = False) -> dict:
    del resume  # nothing to resume: no training
    start = time.perf_counter()
    records = read_prompts(cfg.data) if cfg.data else None  # bad data fails before anything slow
    out = prepare_output(cfg.output_dir, resume=False)
    rm_dir, kinds = selecting_reward_models(cfg)
    model, tokenizer = load_model(policy_path(cfg.model))
    questions = held_out_questions(cfg, records, tokenizer)
    baseline = greedy_baseline(model, tokenizer, questions)
    samples = sample_solutions(model, tokenizer, questions, cfg.max_n, cfg.temperature, cfg.seed)
    scores = score_samples(rm_dir, kinds, samples)
    ns = [2**i for i in range(cfg.max_n.bit_length()) if 2**i <= cfg.max_n]
    curves = selector_curves(samples, scores, ns, cfg.subsets, cfg.seed)

    count = len(questions.prompts)
    tokens_per_sample = sum(map(sum, samples.tokens)) / (count * cfg.max_n)
    seconds_per_sample = samples.seconds / (count * cfg.max_n)
    cost = {"n": ns, "generated_tokens_per_problem": [n * tokens_per_sample for n in ns],
            "sampling_seconds_per_problem": [n * seconds_per_sample for n in ns],
            "greedy_tokens_per_problem": baseline["generated_tokens"] / count}
    at = ns.index(cfg.headline_n)
    better = max(scores or ["majority"], key=lambda kind: curves[kind][at])  # without reward models: the vote
    title = "Best-of-N on " + (f"{cfg.data}" if records else f"{'/'.join(map(str, cfg.difficulties))}-digit addition")
    accuracy_vs_n(ns, curves, baseline["accuracy"], out / "accuracy_vs_n.png", title)
    cost_vs_n(cost, out / "cost_vs_n.png")
    selector = f"the {better.upper()}" if scores else "majority vote"
    metrics = {"accuracy": curves[better][at], "headline": f"best-of-{cfg.headline_n} with {selector}",
               "by_n": {"n": ns, **curves}, "ordering": ordering(curves, ns), "cost": cost,
               "sample_accuracy": sum(map(sum, samples.correct)) / (count * cfg.max_n),
               "reward_models": str(rm_dir) if rm_dir else None}
    elapsed = time.perf_counter() - start
    result = TrainResult([], {}, elapsed, sum(map(sum, samples.tokens)) / samples.seconds)
    return write_summary(out, "best-of-n", cfg, metrics, baseline, model, result)
