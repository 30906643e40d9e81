"""Tree search: step-level beam search guided by a process reward model (Yao et al. 2023; Snell et al. 2024).

    beams = [empty solution]
    repeat until every beam has answered (or max_depth):
        expand   each unfinished beam by sampling `expansions` next steps (generation stops at a newline)
        score    each candidate with the PRM: min of its step probabilities so far (finished candidates:
                 the PRM's full solution score, the answer included)
        keep     the `beam_width` best distinct candidates (finished ones stay in the race)
    answer = the best finished beam

The search spends generated tokens on the prefixes the PRM likes instead of on whole independent
samples. It is compared with best-of-N at an equal budget: best-of-N's N is the search's generated
tokens per problem divided by the tokens of one sampled solution, and its accuracy at that N (PRM
selection, expectation over N-subsets of a sampled pool) is reported beside the search's.

When the reward-model folder holds both PRMs (`posttrain reward prm_labels=both`: prm/ on the step checker's
labels, prm-ms/ on Math-Shepherd's), the search runs with each, from the same seeds, and `metrics.by_prm` holds
both results; the headline is `prm`'s.

`search` is written against two functions, `expand(prompts, partials) -> continuations` and
`score(prompts, partials, finished) -> scores`, so its bookkeeping is tested with scripted fakes.

    posttrain tree-search --output-dir runs/tree-search
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

from posttrain.errors import UserError
from posttrain.evaluation import best_of_n
from posttrain.generation import generate
from posttrain.methods.common import policy_path, prepare_output, write_summary
from posttrain.methods.test_time import Questions, greedy_baseline, sample_solutions
from posttrain.methods.test_time.best_of_n import reward_model_dir
from posttrain.models import load_model
from posttrain.reward_models import load_reward_model
from posttrain.training import TrainResult


@dataclasses.dataclass
class TreeSearchConfig:
    model: str = "sft-policy"  # the policy that proposes steps: sft-policy (shared CoT SFT model), a folder or hub id
    reward_models: str = ""  # folder with prm/ from `posttrain reward` ("": the cached stage on the policy)
    prm: str = "prm"  # the PRM that guides: prm (checker labels) | prm-ms (Math-Shepherd labels, prm_labels=both)
    output_dir: str = "runs/tree-search"  # where summary.json goes
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    problems: int = 40  # held-out test problems
    beam_width: int = 4  # partial solutions kept after each step
    expansions: int = 4  # next steps sampled per kept partial solution
    max_depth: int = 8  # steps (lines) at most, the answer line included
    temperature: float = 1.0  # sampling temperature of the proposed steps
    pool: int = 32  # samples per problem for the equal-budget best-of-N comparison
    seed: int = 0  # seeds the test problems and the sampling

    def validate(self) -> None:
        if self.prm not in PRMS:
            raise UserError(f"prm must be prm or prm-ms (the folder of the reward_models output), got '{self.prm}'")
        if min(self.beam_width, self.expansions, self.max_depth, self.problems) < 1 or self.pool < 2:
            raise UserError("beam_width, expansions, max_depth and problems must be >= 1, pool >= 2")


CONFIG = TreeSearchConfig
PRMS = ("prm", "prm-ms")  # the PRM folders of a `posttrain reward` output: checker labels, Math-Shepherd labels
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "problems": 16, "pool": 16}


@dataclasses.dataclass(frozen=True)
class Beam:
    text: str  # the partial (or finished) completion
    score: float
    finished: bool


Expand = Callable[[list[str], list[str]], list[tuple[list[str], list[bool], int]]]  # per partial: (steps, finished, tokens)
Score = Callable[[list[str], list[str], list[bool]], list[float]]


def next_beams(candidates: list[Beam], width: int) -> list[Beam]:
    """The `width` best candidates by score, one per distinct text (the first one met wins a tie)."""
    seen, distinct = set(), []
    for c in candidates:
        if c.text not in seen:
            seen.add(c.text)
            distinct.append(c)
    return sorted(distinct, key=lambda b: -b.score)[:width]  # a stable sort: ties keep their order


def search(prompts: list[str], expand: Expand, score: Score, width: int, max_depth: int) -> tuple[list[Beam], list[int]]:
    """Beam search for every prompt at once: (the best beam per prompt, generated tokens per prompt)."""
    beams = [[Beam("", 0.0, False)] for _ in prompts]
    tokens = [0] * len(prompts)
    for _ in range(max_depth):
        open_ = [(i, b) for i, bs in enumerate(beams) for b in bs if not b.finished]
        if not open_:
            break
        grown = expand([prompts[i] for i, _ in open_], [b.text for _, b in open_])
        candidates = [[b for b in bs if b.finished] for bs in beams]
        texts, owners, finished = [], [], []
        for (i, beam), (steps, done, n_tokens) in zip(open_, grown):
            tokens[i] += n_tokens
            for step, is_done in zip(steps, done):
                texts.append(beam.text + step)
                owners.append(i)
                finished.append(is_done)
        scores = score([prompts[i] for i in owners], texts, finished)
        for i, text, s, done in zip(owners, texts, scores, finished):
            candidates[i].append(Beam(text, s, done))
        beams = [next_beams(c, width) for c in candidates]
    best = [max(bs, key=lambda b: (b.finished, b.score)) for bs in beams]
    return best, tokens


def policy_expander(model, tokenizer, k: int, temperature: float, max_step_tokens: int, seed: int) -> Expand:
    """Sample `k` next lines for each partial solution with the policy (stop at a newline or EOS)."""
    newlines = tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))
    calls = [0]

    def expand(prompts: list[str], partials: list[str]):
        calls[0] += 1
        samples = generate(model, tokenizer, [q + p for q, p in zip(prompts, partials)], max_new_tokens=max_step_tokens,
                           temperature=temperature, num_samples=k, seed=seed * 1000 + calls[0], stop_ids=newlines)
        out = []
        for j in range(len(prompts)):
            rows = range(j * k, (j + 1) * k)
            ended = [samples.token_ids[r][-1:] == [tokenizer.eos_token_id] or not samples.stopped[r] for r in rows]
            out.append(([samples.texts[r] for r in rows], ended, sum(len(samples.token_ids[r]) for r in rows)))
        return out

    return expand


def prm_scorer(prm) -> Score:
    """Finished candidates: the PRM's solution score; partial ones: the min of their step probabilities."""

    def score(prompts: list[str], partials: list[str], finished: list[bool]) -> list[float]:
        full = prm.score(prompts, partials)
        steps = prm.step_scores(prompts, partials)
        return [f if done else min(s, default=1.0) for f, s, done in zip(full, steps, finished)]

    return score


def guiding_prms(rm_dir, headline: str) -> list[str]:
    """The headline PRM first, then the other PRM the folder holds (prm_labels=both trains both)."""
    return [headline] + [kind for kind in PRMS if kind != headline and (rm_dir / kind).is_dir()]


def search_with(prm, model, tokenizer, questions, pool, cfg: TreeSearchConfig) -> dict:
    """The PRM-guided search's accuracy and tokens, and best-of-N with the same PRM at the search's token
    budget over the sampled `pool` (its N: the search's tokens per problem / one sample's)."""
    step_budget = questions.max_new_tokens // 2  # a step line is far shorter than a solution
    t0 = time.perf_counter()
    expand = policy_expander(model, tokenizer, cfg.expansions, cfg.temperature, step_budget, cfg.seed)
    best, tokens = search(questions.prompts, expand, prm_scorer(prm), cfg.beam_width, cfg.max_depth)
    seconds = time.perf_counter() - t0
    correct = [questions.correct(i, b.text) for i, b in enumerate(best)]
    n_problems = len(questions.prompts)
    tokens_per_sample = sum(map(sum, pool.tokens)) / (n_problems * cfg.pool)
    tokens_per_problem = sum(tokens) / n_problems
    n_equal = max(1, min(cfg.pool, round(tokens_per_problem / tokens_per_sample)))
    flat = prm.score([q for q, ts in zip(pool.prompts, pool.texts) for _ in ts], [t for ts in pool.texts for t in ts])
    groups = [flat[i * cfg.pool : (i + 1) * cfg.pool] for i in range(n_problems)]
    bon = sum(best_of_n(scores, right, n_equal) for scores, right in zip(groups, pool.correct)) / n_problems
    return {"accuracy": sum(correct) / len(correct), "generated_tokens_per_problem": tokens_per_problem,
            "search_seconds": seconds, "tokens": sum(tokens),
            "best_of_n_equal_budget": {"n": n_equal, "accuracy": bon, "tokens_per_problem": n_equal * tokens_per_sample},
            "finished": sum(b.finished for b in best) / len(best),
            "samples": [{"prompt": q, "completion": b.text, "score": b.score, "correct": bool(c)}
                        for q, b, c in list(zip(questions.prompts, best, correct))[:20]]}


def run(cfg: TreeSearchConfig, resume: bool = False) -> dict:
    del resume  # nothing to resume: no training
    start = time.perf_counter()
    out = prepare_output(cfg.output_dir, resume=False)
    rm_dir = reward_model_dir(cfg)
    prms = {kind: load_reward_model(rm_dir / kind) for kind in guiding_prms(rm_dir, cfg.prm)}
    model, tokenizer = load_model(policy_path(cfg.model))
    questions = Questions.world(tokenizer, cfg.difficulties, cfg.problems, cfg.seed)
    baseline = greedy_baseline(model, tokenizer, questions)
    pool = sample_solutions(model, tokenizer, questions, cfg.pool, cfg.temperature, cfg.seed)  # for best-of-N
    by_prm = {kind: search_with(prm, model, tokenizer, questions, pool, cfg) for kind, prm in prms.items()}

    head = by_prm[cfg.prm]
    metrics = {**{k: v for k, v in head.items() if k != "tokens"},
               "headline": f"beam {cfg.beam_width} x {cfg.expansions} expansions, {cfg.prm.upper()}-guided",
               "best_of_n_equal_budget": {**head["best_of_n_equal_budget"], "selector": cfg.prm},
               "by_prm": {kind: {"accuracy": r["accuracy"], "generated_tokens_per_problem": r["generated_tokens_per_problem"],
                                 "best_of_n_equal_budget": r["best_of_n_equal_budget"]} for kind, r in by_prm.items()}}
    elapsed = time.perf_counter() - start
    result = TrainResult([], {}, elapsed, head["tokens"] / head["search_seconds"])
    return write_summary(out, "tree-search", cfg, metrics, baseline, model, result)
