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
or any folder holding its orm/ and prm/ (`reward_models=DIR`). Cost against N: generated tokens and
sampling seconds per problem grow linearly with N (sampling k once and sharing it out is the measured
cost times N/k). The summary says, with numbers, whether PRM selection beats ORM selection and majority
voting as N grows, the ordering "Let's Verify Step by Step" reports, whichever way it comes out here.

    posttrain best-of-n --output-dir runs/best-of-n
    posttrain best-of-n --model ./my-policy reward_models=runs/reward
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from posttrain.errors import UserError
from posttrain.evaluation import best_of_n, majority_at_n, pass_at_k
from posttrain.methods.common import prepare_output, write_summary
from posttrain.methods.rl.reward_model import trained_reward_models
from posttrain.methods.test_time import greedy_baseline, sample_solutions
from posttrain.models import load_model
from posttrain.report.test_time_plots import accuracy_vs_n, cost_vs_n
from posttrain.reward_models import load_reward_model
from posttrain.rl.rollouts import POLICIES, policy_path
from posttrain.training import TrainResult
from posttrain.world import MAIN_SKILL, sample_problems

SELECTORS = ("orm", "prm", "majority", "oracle")


@dataclasses.dataclass
class BestOfNConfig:
    model: str = "sft-policy"  # the policy that samples: sft-policy (shared CoT SFT model), a folder or hub id
    reward_models: str = ""  # folder with orm/ and prm/ from `posttrain reward` ("": the cached stage on the policy)
    output_dir: str = "runs/best-of-n"  # where summary.json and the plots go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    problems: int = 40  # held-out test problems
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


def reward_model_dir(cfg) -> Path:
    """Where orm/ and prm/ are: the given folder, or the cached reward stage of the shared policy."""
    if cfg.reward_models:
        return Path(cfg.reward_models)
    if cfg.model not in POLICIES:
        raise UserError(f"model '{cfg.model}' is not the shared policy: give reward_models=DIR (a `posttrain reward` output)")
    return trained_reward_models(quick=POLICIES[cfg.model])


def selector_curves(samples, orm_scores, prm_scores, ns: list[int], subsets: int, seed: int) -> dict:
    """Accuracy at each N for every selector, averaged over problems."""
    k = len(samples.texts[0])
    per_problem = {
        "orm": lambda i, n: best_of_n(orm_scores[i], samples.correct[i], n),
        "prm": lambda i, n: best_of_n(prm_scores[i], samples.correct[i], n),
        "majority": lambda i, n: majority_at_n(samples.answers[i], samples.problems[i].answer, n, subsets, seed + i),
        "oracle": lambda i, n: pass_at_k(k, int(sum(samples.correct[i])), n),
    }
    P = len(samples.problems)
    return {name: [sum(f(i, n) for i in range(P)) / P for n in ns] for name, f in per_problem.items()}


def ordering(curves: dict, ns: list[int]) -> dict:
    """Where PRM selection beats ORM selection and majority voting, and the sentence that says so."""
    def wins(a: str, b: str) -> list[int]:
        return [n for n, x, y in zip(ns, curves[a], curves[b]) if x > y]

    last = {name: round(curves[name][-1], 3) for name in SELECTORS}
    sentence = (f"At N={ns[-1]}: PRM {last['prm']}, ORM {last['orm']}, majority {last['majority']}, oracle {last['oracle']}. "
                f"PRM beats ORM at N in {wins('prm', 'orm') or 'none'} and majority voting at N in "
                f"{wins('prm', 'majority') or 'none'}.")
    return {"prm_beats_orm_at": wins("prm", "orm"), "prm_beats_majority_at": wins("prm", "majority"), "summary": sentence}


def run(cfg: BestOfNConfig, resume: bool = False) -> dict:
    del resume  # nothing to resume: no training
    start = time.perf_counter()
    out = prepare_output(cfg.output_dir, resume=False)
    rm_dir = reward_model_dir(cfg)
    model, tokenizer = load_model(policy_path(cfg.model))
    problems = sample_problems(MAIN_SKILL, cfg.difficulties, cfg.problems, "test", cfg.seed)
    baseline = greedy_baseline(model, tokenizer, problems)
    samples = sample_solutions(model, tokenizer, problems, cfg.max_n, cfg.temperature, cfg.seed)

    scores = {}
    for kind in ("orm", "prm"):
        rm = load_reward_model(rm_dir / kind)
        flat = rm.score([q for q, ts in zip(samples.prompts, samples.texts) for _ in ts], [t for ts in samples.texts for t in ts])
        scores[kind] = [flat[i * cfg.max_n : (i + 1) * cfg.max_n] for i in range(len(problems))]
    ns = [2**i for i in range(cfg.max_n.bit_length()) if 2**i <= cfg.max_n]
    curves = selector_curves(samples, scores["orm"], scores["prm"], ns, cfg.subsets, cfg.seed)

    tokens_per_sample = sum(map(sum, samples.tokens)) / (len(problems) * cfg.max_n)
    seconds_per_sample = samples.seconds / (len(problems) * cfg.max_n)
    cost = {"n": ns, "generated_tokens_per_problem": [n * tokens_per_sample for n in ns],
            "sampling_seconds_per_problem": [n * seconds_per_sample for n in ns],
            "greedy_tokens_per_problem": baseline["generated_tokens"] / len(problems)}
    at = ns.index(cfg.headline_n)
    better = max(("orm", "prm"), key=lambda kind: curves[kind][at])
    digits = "/".join(map(str, cfg.difficulties))
    accuracy_vs_n(ns, curves, baseline["accuracy"], out / "accuracy_vs_n.png", f"Best-of-N on {digits}-digit addition")
    cost_vs_n(cost, out / "cost_vs_n.png")
    metrics = {"accuracy": curves[better][at], "headline": f"best-of-{cfg.headline_n} with the {better.upper()}",
               "by_n": {"n": ns, **curves}, "ordering": ordering(curves, ns), "cost": cost,
               "sample_accuracy": sum(map(sum, samples.correct)) / (len(problems) * cfg.max_n),
               "reward_models": str(rm_dir)}
    elapsed = time.perf_counter() - start
    result = TrainResult([], {}, elapsed, sum(map(sum, samples.tokens)) / samples.seconds)
    return write_summary(out, "best-of-n", cfg, metrics, baseline, model, result)
