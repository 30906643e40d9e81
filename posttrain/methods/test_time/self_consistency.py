"""Self-consistency: sample k chains of thought and answer with the majority (Wang et al. 2023).

    for each held-out problem: k samples at `temperature`, their final answers (the `A:` line)
    maj@n   accuracy of the most common answer among n of them (ties: the first seen), n = 1, 2, 4, ..., k,
            the expectation over n-subsets of the k samples (evaluation.majority_at_n)
    confidence  the winning answer's vote share at n = k; problems split at the median share into a
            more and a less confident half, each with its accuracy; reliability plot and ECE of the share

No reward model and no training: the only signal is agreement between samples. The headline is maj@k
(default k = 16) against the greedy accuracy of the same model.

What to expect from the shared SFT policy: little. Its samples are right a little more often than its
greedy answers, but its errors are one systematic slip (the carry of a column totalling 10, written
right in about a tenth of its samples), and on those problems the majority is the slip, as greedy is:
voting gains where errors scatter. The gain over greedy is a few problems in a hundred, within the
noise of 100 problems: hence 300 problems by default.

With a chat model and no `--data` (`--model posttrain:smollm2-135m`), the questions are world additions
asked in words (world/chat.py) and the answers are read from the replies as world/answers.py reads them.

With `--data`, the questions are the user's `{"prompt", "answer"}` records (the first `problems` of
them) and answers are read as world/answers.py reads them, numbers voted and compared by value.

    posttrain self-consistency --output-dir runs/self-consistency
    posttrain self-consistency --model Qwen/Qwen2.5-0.5B-Instruct --data math.jsonl k=8 max_new_tokens=512
"""
from __future__ import annotations

import dataclasses
import time

from posttrain.errors import UserError
from posttrain.evaluation import calibration, majority_at_n, majority_vote
from posttrain.methods.common import policy_path, prepare_output, write_summary
from posttrain.methods.test_time import greedy_baseline, held_out_questions, sample_solutions
from posttrain.models import load_model
from posttrain.records import read_prompts
from posttrain.rewards import warn_if_all_zero
from posttrain.report.test_time_plots import accuracy_vs_n, reliability
from posttrain.training import TrainResult


@dataclasses.dataclass
class SelfConsistencyConfig:
    model: str = "sft-policy"  # sft-policy (shared CoT SFT model), a folder or hub id
    data: str | None = None  # JSONL of prompt/answer records to answer (the first `problems`); default: world problems
    prompt_field: str = "prompt"  # the --data field holding the prompt (GSM8K: question)
    answer_field: str = "answer"  # the --data field holding the reference answer
    output_dir: str = "runs/self-consistency"  # where summary.json and the plots go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    problems: int = 300  # held-out test problems
    max_new_tokens: int = 256  # reply budget with data or a chat model (world CoT: its longest solution + 8)
    k: int = 16  # samples per problem (maj@k is the headline)
    temperature: float = 1.0  # sampling temperature
    subsets: int = 200  # random n-subsets per problem for maj@n with n < k
    seed: int = 0  # seeds the test problems and the sampling

    def validate(self) -> None:
        if self.k < 2 or self.problems < 2 or self.temperature <= 0:
            raise UserError("k and problems must be >= 2 and temperature > 0")


CONFIG = SelfConsistencyConfig
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "problems": 40, "k": 8}
# The real pretrained chat model: 2-digit additions asked in words, its short replies, and the temperature its
# GRPO preset samples at.
PRESETS = {"posttrain:smollm2-135m": {"difficulties": "2", "k": 16, "temperature": 0.7, "max_new_tokens": 32}}


def confidence_halves(shares: list[float], right: list[bool]) -> dict:
    """Accuracy of the more and the less confident half of the problems (split by vote share, stable)."""
    order = sorted(range(len(shares)), key=lambda i: -shares[i])
    half = len(order) // 2
    top, bottom = order[:half], order[half:]
    mean = lambda idx: sum(right[i] for i in idx) / len(idx)  # noqa: E731
    return {"confident_accuracy": mean(top), "unconfident_accuracy": mean(bottom),
            "confident_mean_share": sum(shares[i] for i in top) / len(top),
            "unconfident_mean_share": sum(shares[i] for i in bottom) / len(bottom)}


def run(cfg: SelfConsistencyConfig, resume: bool = False) -> dict:
    del resume  # nothing to resume: no training
    start = time.perf_counter()
    records = read_prompts(cfg.data, cfg.prompt_field, cfg.answer_field) if cfg.data else None  # bad data fails first
    if records is not None and len(records) < 2:
        raise UserError(f"{cfg.data}: self-consistency needs at least 2 records (it splits them by confidence)")
    out = prepare_output(cfg.output_dir, resume=False)
    model, tokenizer = load_model(policy_path(cfg.model))
    questions = held_out_questions(cfg, records, tokenizer)
    baseline = greedy_baseline(model, tokenizer, questions)
    all_rewards_zero = warn_if_all_zero([baseline["accuracy"]] * baseline["n"], "self-consistency's greedy baseline")
    samples = sample_solutions(model, tokenizer, questions, cfg.k, cfg.temperature, cfg.seed)

    ns = sorted({2**i for i in range(cfg.k.bit_length()) if 2**i <= cfg.k} | {cfg.k})
    pairs = list(enumerate(zip(samples.answers, samples.references)))
    maj = [sum(majority_at_n(a, r, n, cfg.subsets, cfg.seed + i) for i, (a, r) in pairs) / len(pairs) for n in ns]
    votes = [majority_vote(a) for a in samples.answers]
    right = [answer == r for (answer, _), r in zip(votes, samples.references)]
    shares = [share for _, share in votes]
    table = calibration(shares, right)
    accuracy_vs_n(ns, {"majority": maj}, baseline["accuracy"], out / "accuracy_vs_k.png", "Self-consistency: maj@k")
    reliability({"vote share": table}, out / "vote_share_reliability.png", "Vote share as confidence")
    metrics = {"accuracy": maj[-1], "headline": f"maj@{cfg.k}", "by_k": {"k": ns, "majority": maj},
               "sample_accuracy": sum(map(sum, samples.correct)) / (len(pairs) * cfg.k),
               **confidence_halves(shares, right), "vote_share_ece": table["ece"], "reliability": table["bins"],
               "generated_tokens": sum(map(sum, samples.tokens)), "all_rewards_zero": all_rewards_zero}
    elapsed = time.perf_counter() - start
    result = TrainResult([], {}, elapsed, sum(map(sum, samples.tokens)) / samples.seconds)
    return write_summary(out, "self-consistency", cfg, metrics, baseline, model, result)
