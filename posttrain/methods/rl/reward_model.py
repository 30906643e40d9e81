"""Reward modelling: an outcome (ORM) and a process (PRM) reward model learned from the policy's own
solutions, judged on held-out problems, and a reward-hacking experiment with a flawed proxy.

Data comes from the world, not from invented scores. The policy (by default the shared chain-of-
thought SFT model, `posttrain.stages.policy`) samples several solutions per training problem; the
verifier labels each solution right or wrong, the step checker labels each reasoning step.

    ORM   a scalar head on the policy's backbone, read at the last token; Bradley-Terry loss on
          (correct, incorrect) solution pairs of the same prompt (Ouyang et al. 2022, Eq. 1),
          plus `orm_bce_weight` x BCE on correctness (optional)
    PRM   the same architecture read at the newline that ends every step, and at the last token
          for the answer; per-step BCE (Lightman et al. 2023); solution score = min or product of
          the step probabilities (`prm_aggregate`)

The PRM's step labels (`prm_labels`) come from the world's step checker, or without a checker from
Math-Shepherd (Wang et al. 2024, posttrain/rl/process_labels.py): from the prefix that ends at each step
the policy samples `mc_rollouts` completions, and the step's label is 1 if any reaches the verified
answer (hard) or the share that do (soft). Where we depart: the answer's own label is its verdict (no
completion is left to sample after it), and identical prefixes of different samples are completed once.

Held out (test-split problems, samples of the same policy): ORM pairwise accuracy and AUC; PRM step
accuracy and first-error localisation (among solutions with a wrong step, how often the first step
the PRM rejects is the first wrong one); calibration of the PRM's probabilities (reliability plot).

Reward hacking (Gao et al. 2022, "Scaling laws for reward model overoptimization"): a proxy ORM is
trained on preference data with a spurious feature, the way a length-biased rater would produce it:
of two solutions of different length the longer one is preferred, and correctness only breaks ties.
Best-of-N against the proxy for N = 1, 2, 4, ..., 128 (KL from the policy = log N - (N-1)/N), picking
from `hacking_samples` solutions per held-out problem, raises the proxy reward with N while verified
accuracy, after a first rise, falls: large N finds the rare wrong solutions the proxy loves.
`evaluation.overoptimisation_point` flags the N where accuracy has fallen `hacking_tolerance` below its
best while the proxy reward is still rising; the clean ORM's curve over the same N is the control.

What the default run shows (docs/RESULTS.md has its figures): the ORM ranks right above wrong far
better than the policy's own likelihood does, and the PRM finds the first wrong step: the policy's
mistake, the forgotten carry after a column totalling 10, is visible in the step that makes it.
Hacking: the proxy's best-of-N accuracy rises, then falls while its reward keeps rising, and the
detector fires; the clean ORM over the same samples stays silent. Why the proxy turns: on this policy
a longer solution is usually a right one (a kept carry adds the final `0+0+1=1` line and a digit), so
the proxy helps at first; but what it learned from "longer wins" is closer to "bigger numbers win":
its wrong picks are rare digit slips (`7+8+0=16` for 15) of the same length as the right solution
and a larger answer.

Every learned reward model is over-optimised in the end, the clean one too: its training data (768
samples of the policy) hold the systematic carry slip but hardly any of the rare arithmetic slips
(`3+9+1=12`) that a large N digs up, so it cannot rank them. The clean ORM falls much less than the
proxy by N=128 and further by N=256; the default stops at 128, where the two differ clearly (at 64
the proxy's fall is often within the detector's 5-point tolerance). How far the clean ORM falls by
N=64-128 depends on the draw of problems and samples, so on some CPUs its detector fires as well.

Options: `trainable_layers=K` trains only the top K blocks (cheaper per step, for larger backbones).
With `--data FILE.jsonl` (prompt/chosen/rejected records) the run trains the ORM on that data instead;
a seeded 10% of the pairs are held out (at most `eval_pairs` of them measured) and `preference_accuracy`
is the share the ORM ranks chosen over rejected, before and after; there is no PRM or hacking experiment
without step labels.

    posttrain reward --output-dir runs/reward
    posttrain reward --data prefs.jsonl --model ./my-sft-model
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from posttrain.chat_world import CHAT_MAX_NEW_TOKENS, uses_chat_world
from posttrain.data import encode_pair, pad_batch
from posttrain.errors import UserError
from posttrain.evaluation import auc, best_of_n, calibration, max_new_tokens_for, overoptimisation_point
from posttrain.generation import generate, token_logprobs
from posttrain.losses.reward import AGGREGATES, bradley_terry_loss, outcome_bce_loss, prm_step_loss
from posttrain.losses.sft import IGNORE
from posttrain.methods.common import policy_path, prepare_output, write_summary
from posttrain.models import load_model
from posttrain.records import read_preferences, split_records
from posttrain.report.reward_plots import hacking_plot, reliability_plot, reward_histograms
from posttrain.reward_models import (REWARD_MODELS, RewardModel, at_last_token, at_steps, collate, encode,
                                     new_reward_model, step_end_chars)
from posttrain.rl.process_labels import MC_LABELS, hard_labels, label_agreement, mc_labels, soft_labels
from posttrain.world.answers import answer_matches
from posttrain.training import TrainingConfig, TrainResult, row_count, train
from posttrain.world import MAIN_SKILL, check_steps, first_error, render, sample_problems, verify
from posttrain.world.chat import chat_requests


@dataclasses.dataclass
class RewardConfig(TrainingConfig):
    model: str = "sft-policy"  # policy whose solutions are labelled and whose backbone the heads sit on
    data: str | None = None  # JSONL of prompt/chosen/rejected pairs: train an ORM on them instead
    output_dir: str = "runs/reward"  # where summary.json, plots and the orm/, prm/, proxy/ folders go
    difficulties: list[int] = dataclasses.field(default_factory=lambda: [4])  # digits of the addition problems
    train_problems: int = 192  # training problems (train split)
    samples: int = 4  # solutions sampled per training problem
    prm_labels: str = "checker"  # PRM step labels: checker (world step checker) | math-shepherd (Monte-Carlo) | both
    mc_rollouts: int = 8  # math-shepherd: completions sampled from each step prefix (K)
    mc_label: str = "hard"  # math-shepherd: hard (1 if any completion is right) | soft (the share that are)
    test_problems: int = 64  # held-out problems (test split)
    test_samples: int = 16  # solutions per held-out problem that the ORM and PRM are judged on
    hacking_samples: int = 128  # solutions per held-out problem best-of-N picks from: the hacking curve's largest N
    temperature: float = 1.0  # sampling temperature of the policy
    orm_bce_weight: float = 1.0  # weight of BCE on correctness added to the ORM's Bradley-Terry loss
    prm_aggregate: str = "min"  # PRM solution score: min | product of step probabilities
    head: str = "likelihood"  # likelihood (token log-probs, Yuan et al. 2024) | value (a linear head)
    trainable_layers: int = 0  # top transformer blocks trained (the rest frozen); 0 trains all
    hacking_tolerance: float = 0.05  # accuracy drop below the best so far that the hacking detector flags
    eval_pairs: int = 500  # --data: held-out pairs measured, at most (of a seeded tenth of the records)
    steps: int = 120  # optimizer steps per reward model
    batch_size: int = 32  # solutions per step (an ORM step sees batch_size / 2 pairs)
    proxy_steps: int = 60  # optimizer steps of the flawed proxy (its length preference is quick to learn)
    lr: float = 3e-4
    warmup_steps: int = 10

    def validate(self) -> None:
        super().validate()
        if self.head not in REWARD_MODELS:
            raise UserError(f"head must be one of {', '.join(REWARD_MODELS)}, got '{self.head}'")
        if self.prm_aggregate not in AGGREGATES:
            raise UserError(f"prm_aggregate must be one of {', '.join(AGGREGATES)}, got '{self.prm_aggregate}'")
        if self.samples < 2 or self.test_samples < 2:
            raise UserError("samples and test_samples must be >= 2: pairs need two solutions of one prompt")
        if self.hacking_samples < self.test_samples:
            raise UserError(f"hacking_samples ({self.hacking_samples}) must be >= test_samples ({self.test_samples}): "
                            "the judged solutions are the first test_samples of each problem's pool")
        if self.prm_labels not in PRM_LABELS or self.mc_label not in MC_LABELS or self.mc_rollouts < 1:
            raise UserError(f"prm_labels must be one of {', '.join(PRM_LABELS)}, mc_label one of {', '.join(MC_LABELS)} "
                            f"and mc_rollouts >= 1 (got {self.prm_labels}, {self.mc_label}, {self.mc_rollouts})")
        if self.temperature <= 0 or self.orm_bce_weight < 0 or self.trainable_layers < 0:
            raise UserError("temperature must be > 0; orm_bce_weight and trainable_layers must be >= 0")


CONFIG = RewardConfig
# --quick: the smoke-sized twin policy on 2-digit addition.
QUICK = {"model": "sft-policy-quick", "difficulties": "2", "train_problems": 48, "test_problems": 16,
         "test_samples": 8, "hacking_samples": 8, "steps": 20, "log_every": 1, "mc_rollouts": 4}
# The real pretrained chat model: an ORM on its own replies to 2-digit additions asked in words (sampled as
# GRPO samples them, temperature 0.7), the outcome reward model best-of-N selects with on that model.
PRESETS = {"posttrain:smollm2-135m": {
    "difficulties": "2", "train_problems": 96, "samples": 8, "test_problems": 64, "test_samples": 8,
    "hacking_samples": 8, "temperature": 0.7, "steps": 40, "batch_size": 16, "lr": 3e-5, "warmup_steps": 4,
}}
# A user's model over LARGE_MODEL_PARAMS parameters (methods/__init__.py): TRL 1.16's RewardConfig learning rate
# (trl/trainer/reward_config.py).
LARGE_MODEL = {"lr": 1e-4}


@dataclasses.dataclass
class Solution:
    """One sampled solution with the world's labels."""

    problem: int  # index of its problem; solutions of one problem share a prompt
    prompt: str
    completion: str
    correct: bool
    steps: list[bool]  # per reasoning step: equal to the reference step?
    answer: str = ""  # the reference answer (world problems), what Math-Shepherd's completions are verified against

    @property
    def prm_labels(self) -> list[bool]:
        """What the PRM is trained to predict: each step, then the answer (the outcome)."""
        return self.steps + [self.correct]


def sample_solutions(model, tokenizer, cfg: RewardConfig, split: str, n_problems: int, k: int) -> list[Solution]:
    """`k` policy samples for each of `n_problems` problems of `split`, labelled by verifier and step checker."""
    # seed + 1: the train-split problems of seed `seed` are the shared SFT policy's own demonstrations
    problems = sample_problems(MAIN_SKILL, cfg.difficulties, n_problems, split, cfg.seed + 1)
    prompts = [render(p, "cot")[0] for p in problems]
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens_for(tokenizer, problems),
                     temperature=cfg.temperature, num_samples=k, seed=cfg.seed + (split == "test")).texts
    return [Solution(i // k, prompts[i // k], text, bool(verify(prompts[i // k], text, problems[i // k].answer)),
                     check_steps(problems[i // k], text), problems[i // k].answer) for i, text in enumerate(texts)]


def chat_solutions(model, tokenizer, cfg: RewardConfig, split: str, n_problems: int, k: int) -> list[Solution]:
    """`k` replies of a chat model to each of `n_problems` world additions of `split` asked as requests
    (world/chat.py), labelled by their answer (world/answers.py); a bare answer has no steps to label."""
    problems = sample_problems(MAIN_SKILL, cfg.difficulties, n_problems, split, cfg.seed + 1)
    prompts, answers = chat_requests(problems)
    texts = generate(model, tokenizer, prompts, max_new_tokens=CHAT_MAX_NEW_TOKENS, temperature=cfg.temperature,
                     num_samples=k, seed=cfg.seed + (split == "test")).texts
    return [Solution(i // k, prompts[i // k], text, bool(answer_matches(text, answers[i // k])), [])
            for i, text in enumerate(texts)]


# Where each PRM goes (its folder, and its summary keys' prefix with "-" as "_"), by the labels it learns from.
PRM_FOLDERS = {"checker": "prm", "math-shepherd": "prm-ms"}
PRM_LABELS = (*PRM_FOLDERS, "both")


def step_prefixes(completion: str) -> list[str]:
    """The completion up to and including the newline that ends each reasoning step: the prefixes whose
    last step the PRM judges (reward_models.step_end_chars, `world.completion_steps`' steps)."""
    return [completion[: end + 1] for end in step_end_chars(completion)]


def rollout_outcomes(model, tokenizer, cfg: RewardConfig, solutions: list[Solution]) -> dict[tuple[str, str], torch.Tensor]:
    """Math-Shepherd's completions: `cfg.mc_rollouts` policy samples from every distinct (prompt, step prefix) of
    `solutions` in one batched `generate`, each outcome 1.0 when the verifier finds the right answer in prefix +
    completion: {(prompt, prefix): outcomes (K,)}. The prefix continues the prompt as text, as tree search
    continues a partial solution; a completion needs at most the longest sampled solution's tokens (+ slack)."""
    answers = {(s.prompt, prefix): s.answer for s in solutions for prefix in step_prefixes(s.completion)}
    keys, k = list(answers), cfg.mc_rollouts
    budget = max(len(tokenizer(s.completion, add_special_tokens=False)["input_ids"]) for s in solutions) + 8
    texts = generate(model, tokenizer, [q + prefix for q, prefix in keys], max_new_tokens=budget,
                     temperature=cfg.temperature, num_samples=k, seed=cfg.seed + 2, desc="math-shepherd rollouts").texts
    return {(q, prefix): torch.tensor([verify(q, prefix + t, answers[q, prefix]) for t in texts[i * k : (i + 1) * k]])
            for i, (q, prefix) in enumerate(keys)}


def math_shepherd_labels(solutions: list[Solution], outcomes: dict, estimate: str) -> list[list[float]]:
    """Each solution's PRM targets: the hard or soft label (`estimate`) of every step from its completions'
    outcomes, then the answer's own verdict (nothing is left to complete after it)."""
    return [[mc_labels(outcomes[s.prompt, prefix], estimate).item() for prefix in step_prefixes(s.completion)]
            + [float(s.correct)] for s in solutions]


def mc_label_report(solutions: list[Solution], outcomes: dict, estimate: str) -> dict:
    """How the Monte-Carlo labels of the training steps agree with the step checker's (each step of each
    solution counted, as the PRM trains on them), and the mean soft label of the steps it calls right and wrong."""
    pairs = [(outcomes[s.prompt, prefix], ok) for s in solutions for prefix, ok in zip(step_prefixes(s.completion), s.steps)]
    if not pairs:  # a policy that writes no steps: nothing to compare
        return {"mc_label_agreement": None, "mc_labels": {"estimate": estimate, "steps": 0}}
    found = torch.stack([o for o, _ in pairs])  # (steps, K)
    checker = torch.tensor([ok for _, ok in pairs])  # (steps,)
    soft = soft_labels(found)
    mean = lambda x: x.mean().item() if len(x) else None  # noqa: E731
    return {"mc_label_agreement": label_agreement(mc_labels(found, estimate), checker),
            "mc_labels": {"estimate": estimate, "rollouts": found.shape[1], "prefixes": len(outcomes), "steps": len(pairs),
                          "hard_agreement": label_agreement(hard_labels(found), checker),
                          "soft_agreement": label_agreement(soft, checker),
                          "soft_label_of_right_steps": mean(soft[checker]), "soft_label_of_wrong_steps": mean(soft[~checker])}}


def by_problem(solutions: list[Solution]) -> list[list[Solution]]:
    groups: dict[int, list[Solution]] = {}
    for s in solutions:
        groups.setdefault(s.problem, []).append(s)
    return list(groups.values())


def first_of_each(solutions: list[Solution], k: int) -> list[Solution]:
    """The first `k` solutions of every problem: a smaller pool of the same independent samples."""
    return [s for group in by_problem(solutions) for s in group[:k]]


def distinct(group: list[Solution]) -> list[Solution]:
    """One solution per distinct text: repeated samples would only repeat the same pair."""
    return list({s.completion: s for s in group}.values())


def correctness_pairs(solutions: list[Solution]) -> list[tuple[Solution, Solution]]:
    """(chosen, rejected) = every (correct, incorrect) pair of distinct solutions to the same problem."""
    return [(c, w) for group in map(distinct, by_problem(solutions)) for c in group if c.correct
            for w in group if not w.correct]


def length_biased_pairs(solutions: list[Solution]) -> list[tuple[Solution, Solution]]:
    """The flawed rater: of two distinct solutions of different length the longer wins; correctness
    breaks ties. Length is then perfectly 'predictive' of its preferences, correctness only partly."""
    longer = lambda a, b: (len(a.completion), a.correct) > (len(b.completion), b.correct)  # noqa: E731
    return [(a, b) for group in map(distinct, by_problem(solutions)) for a in group for b in group if longer(a, b)]


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of an epoch-wise seeded shuffle: a pure function of the step (the loop's resume contract)."""
    per_epoch = max(1, n // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    order = order * (batch_size // n + 1)  # fewer rows than a batch: wrap around
    return order[index * batch_size : index * batch_size + batch_size]


def freeze_lower_layers(rm: RewardModel, trainable_layers: int) -> None:
    """Train only the top `trainable_layers` blocks, what follows them (final norm) and the head."""
    if not trainable_layers:
        return
    first = rm.backbone.config.num_hidden_layers - trainable_layers
    embeddings = rm.backbone.get_input_embeddings().weight
    for name, param in rm.backbone.named_parameters():
        block = re.search(r"\.(\d+)\.", f".{name}")  # parameters of block i are named like `layers.i.`
        param.requires_grad = int(block.group(1)) >= first if block else param is not embeddings


TOKEN_KEYS = ("input_ids", "attention_mask", "completion_mask")


def pair_batch(chosen: list, rejected: list, pad_id: int) -> dict:
    """input_ids and attention_mask of shape (P, 2, T): [:, 0] chosen, [:, 1] rejected, one width, so
    the training loop's micro-batch and per-process slicing (along dim 0) keeps every pair together."""
    full = collate(chosen + rejected, pad_id)
    p = len(chosen)
    return {k: full[k].view(2, p, -1).transpose(0, 1) for k in TOKEN_KEYS}


def train_orm(cfg: RewardConfig, pairs: list[tuple], name: str, out: Path, resume: bool,
              bce_weight: float = 0.0) -> tuple[RewardModel, TrainResult]:
    """An ORM on (chosen, rejected) pairs of (prompt, completion, correct) triples; BT (+ BCE) loss."""
    if not pairs:
        raise UserError(f"{name}: no preference pairs (every problem's samples were all right or all wrong); "
                        "raise samples or temperature")
    torch.manual_seed(cfg.seed)  # the head's initialisation
    rm = new_reward_model(policy_path(cfg.model), "orm", head=cfg.head)
    freeze_lower_layers(rm, cfg.trainable_layers)
    tok = rm.tokenizer
    encoded = [(encode(tok, c[0], c[1]), encode(tok, r[0], r[1])) for c, r in pairs]
    outcomes = [(float(c[2] or 0), float(r[2] or 0)) for c, r in pairs]  # used only with bce_weight

    def batch_fn(step: int) -> dict:
        picks = batch_indices(len(pairs), max(1, cfg.batch_size // 2), cfg.seed, step)
        batch = pair_batch([encoded[i][0] for i in picks], [encoded[i][1] for i in picks], tok.pad_token_id)
        batch["correct"] = torch.tensor([outcomes[i] for i in picks])  # (P, 2)
        return batch

    def loss_fn(model, batch):
        flat = {k: batch[k].flatten(0, 1) for k in TOKEN_KEYS}  # (2P, T): chosen and rejected rows
        rewards = at_last_token(model(flat), flat).view(-1, 2)  # (P, 2)
        loss, metrics = bradley_terry_loss(rewards[:, 0], rewards[:, 1])
        if bce_weight:
            bce, bce_metrics = outcome_bce_loss(rewards.flatten(), batch["correct"].flatten())
            loss, metrics = loss + bce_weight * bce, {**metrics, **bce_metrics}
        return loss, {"loss": loss.item(), **metrics}

    logs = out / "training" / name
    result = train(rm, batch_fn, loss_fn, cfg, logs, resume=resume and (logs / "checkpoint").exists(), desc=name,
                   averages_over=row_count)  # the pairs
    return rm, result


def train_prm(cfg: RewardConfig, solutions: list[Solution], labels: list[list[float]], name: str, out: Path,
              resume: bool) -> tuple[RewardModel, TrainResult]:
    """A PRM on every training solution: BCE at each step's newline and at the final token against `labels`
    (per solution: each step's, then the answer's; 0/1, or a share for Math-Shepherd's soft labels)."""
    torch.manual_seed(cfg.seed)
    rm = new_reward_model(policy_path(cfg.model), "prm", cfg.prm_aggregate, cfg.head)
    freeze_lower_layers(rm, cfg.trainable_layers)
    tok = rm.tokenizer
    encoded = [encode(tok, s.prompt, s.completion) for s in solutions]

    def batch_fn(step: int) -> dict:
        picks = batch_indices(len(solutions), cfg.batch_size, cfg.seed, step)
        batch = collate([encoded[i] for i in picks], tok.pad_token_id)
        width = batch["steps"].shape[1]
        batch["step_labels"] = torch.tensor([[float(x) for x in labels[i]] + [0.0] * (width - len(labels[i])) for i in picks])
        return batch

    def loss_fn(model, batch):
        loss, metrics = prm_step_loss(at_steps(model(batch), batch), batch["step_labels"], batch["step_mask"])
        return loss, {"loss": loss.item(), **metrics}

    logs = out / "training" / name
    result = train(rm, batch_fn, loss_fn, cfg, logs, resume=resume and (logs / "checkpoint").exists(), desc=name,
                   averages_over=lambda batch: int(batch["step_mask"].sum()))  # the labelled steps
    return rm, result


@torch.no_grad()
def likelihood_scores(model, tokenizer, solutions: list[Solution], batch_size: int = 128) -> list[float]:
    """The policy's own confidence in each solution: its mean log-prob per completion token."""
    model.eval()
    scores = []
    for start in range(0, len(solutions), batch_size):
        rows = [encode_pair(tokenizer, s.prompt, s.completion) for s in solutions[start : start + batch_size]]
        batch = {k: v.to(model.device) for k, v in pad_batch(rows, tokenizer.pad_token_id).items()}
        logps = token_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])  # (B, T-1)
        scores += (logps.sum(-1) / (batch["labels"][:, 1:] != IGNORE).sum(-1)).cpu().tolist()
    return scores


def likelihood_baseline(policy, tokenizer, test: list[Solution]) -> tuple[list[float], dict]:
    """The baseline a reward model has to beat: the policy's own likelihood as a scorer of the same pairs
    (its scores, and the summary's `baseline`)."""
    likelihood = likelihood_scores(policy, tokenizer, test)
    return likelihood, {"accuracy": pair_accuracy(likelihood, test)["accuracy"],
                        "auc": auc(likelihood, [s.correct for s in test]), "scorer": "policy mean token log-prob"}


def triples(pairs: list[tuple[Solution, Solution]]) -> list[tuple]:
    """(chosen, rejected) solutions as the (prompt, completion, correct) triples `train_orm` takes."""
    return [((c.prompt, c.completion, c.correct), (r.prompt, r.completion, r.correct)) for c, r in pairs]


def pair_accuracy(scores: list[float], solutions: list[Solution]) -> dict:
    """Fraction of (correct, incorrect) pairs of one problem that the scores order right (ties: 1/2)."""
    index = {id(s): i for i, s in enumerate(solutions)}
    pairs = correctness_pairs(solutions)
    wins = sum((scores[index[id(c)]] > scores[index[id(w)]]) + 0.5 * (scores[index[id(c)]] == scores[index[id(w)]])
               for c, w in pairs)
    return {"accuracy": wins / len(pairs) if pairs else None, "pairs": len(pairs)}


def evaluate_orm(orm: RewardModel, test: list[Solution]) -> dict:
    scores = orm.score([s.prompt for s in test], [s.completion for s in test])
    labels = [s.correct for s in test]
    pairs = pair_accuracy(scores, test)
    return {"orm_pair_accuracy": pairs["accuracy"], "orm_pairs": pairs["pairs"], "orm_auc": auc(scores, labels),
            "_scores": scores}


def evaluate_prm(prm: RewardModel, test: list[Solution]) -> dict:
    """Step accuracy, first-error localisation, solution-level AUC/pairs and calibration of the PRM."""
    prompts, completions = [s.prompt for s in test], [s.completion for s in test]
    scores = prm.score(prompts, completions)
    step_probs = prm.step_scores(prompts, completions)
    flat = [(p, y) for probs, s in zip(step_probs, test) for p, y in zip(probs, s.steps)]
    with_error = [(probs, s) for probs, s in zip(step_probs, test) if first_error(s.steps) is not None]
    located = sum(first_error([p > 0.5 for p in probs]) == first_error(s.steps) for probs, s in with_error)
    step_cal = calibration([p for p, _ in flat], [y for _, y in flat])
    return {
        "prm_step_accuracy": sum((p > 0.5) == y for p, y in flat) / len(flat),
        "prm_step_label_mean": sum(y for _, y in flat) / len(flat),  # the accuracy of always saying "right"
        "prm_first_error_accuracy": located / len(with_error) if with_error else None,
        "prm_solutions_with_error": len(with_error),
        "prm_pair_accuracy": pair_accuracy(scores, test)["accuracy"],
        "prm_auc": auc(scores, [s.correct for s in test]),
        "prm_step_ece": step_cal["ece"],
        "prm_solution_ece": calibration(scores, [s.correct for s in test])["ece"],
        "_scores": scores, "_step_calibration": step_cal,
    }


def hacking_curve(scores: list[float], test: list[Solution], ns: list[int]) -> list[dict]:
    """Best-of-N against `scores`: mean selected score and verified accuracy for each N (expected over
    all N-subsets of each problem's samples, evaluation.best_of_n)."""
    index = {id(s): i for i, s in enumerate(test)}
    groups = [([scores[index[id(s)]] for s in g], g) for g in by_problem(test)]
    curve = []
    for n in ns:
        picked = [best_of_n(sc, sc, n) for sc, _ in groups]
        right = [best_of_n(sc, [float(s.correct) for s in g], n) for sc, g in groups]
        curve.append({"n": n, "reward": sum(picked) / len(picked), "accuracy": sum(right) / len(right)})
    return curve


def hacking_experiment(cfg: RewardConfig, proxy: RewardModel, orm: RewardModel, pool: list[Solution]) -> dict:
    """Best-of-N curves of the proxy and the clean ORM on `pool` (`hacking_samples` solutions of each held-out
    problem), and where the detector fires on each."""
    ns = [2**i for i in range(cfg.hacking_samples.bit_length()) if 2**i <= cfg.hacking_samples]
    result = {}
    for name, rm in (("proxy", proxy), ("orm", orm)):
        curve = hacking_curve(rm.score([s.prompt for s in pool], [s.completion for s in pool]), pool, ns)
        fired = overoptimisation_point(ns, [c["reward"] for c in curve], [c["accuracy"] for c in curve], cfg.hacking_tolerance)
        result[name] = {"curve": curve, "detected_at_n": fired}
    return result


def label_sources(prm_labels: str) -> list[str]:
    """The label sources a PRM is trained on: `prm_labels`, or both checker and math-shepherd."""
    return list(PRM_FOLDERS) if prm_labels == "both" else [prm_labels]


def train_prms(cfg: RewardConfig, train_set: list[Solution], outcomes: dict | None, out: Path,
               resume: bool) -> dict[str, tuple[RewardModel, TrainResult]]:
    """One PRM per label source of `cfg.prm_labels`, by folder name: prm/ on the checker's labels, prm-ms/ on
    Math-Shepherd's from the completion `outcomes`."""
    labels = {"checker": lambda: [s.prm_labels for s in train_set],
              "math-shepherd": lambda: math_shepherd_labels(train_set, outcomes, cfg.mc_label)}
    return {PRM_FOLDERS[source]: train_prm(cfg, train_set, labels[source](), PRM_FOLDERS[source], out, resume)
            for source in label_sources(cfg.prm_labels)}


def evaluate_prms(prms: dict, test: list[Solution], out: Path) -> tuple[dict, dict]:
    """Each PRM's held-out metrics against the checker (prm/'s as `prm_*`, prm-ms/'s as `prm_ms_*`), its
    reliability plot, and its solution scores by histogram label."""
    metrics, scores = {}, {}
    for name, (prm, _) in prms.items():
        found = evaluate_prm(prm, test)
        scores["PRM score" if name == "prm" else "PRM score (Math-Shepherd labels)"] = found.pop("_scores")
        reliability_plot(found.pop("_step_calibration"), out / f"{name}_reliability.png")
        prefix = name.replace("-", "_") + "_"
        metrics.update({prefix + key.removeprefix("prm_"): value for key, value in found.items()})
    return metrics, scores


def require_checker_labels(cfg: RewardConfig, what: str) -> None:
    """Runs without step-by-step solutions train no PRM: a Math-Shepherd setting there is a mistake."""
    if cfg.prm_labels != "checker":
        raise UserError(f"prm_labels={cfg.prm_labels}: {what} trains an ORM only, with no reasoning steps to label; "
                        "drop prm_labels (Math-Shepherd labels need the world's chain-of-thought solutions)")


def run(cfg: RewardConfig, resume: bool = False) -> dict:
    """ORM, PRM(s) and the hacking experiment on the policy's own solutions (the module docstring).

    `prm_labels` picks the PRM's step labels: `checker` (the world's step checker, prm/), `math-shepherd`
    (Monte-Carlo labels from `mc_rollouts` completions of every step prefix of the training solutions,
    `mc_label` hard or soft estimation, prm-ms/), or `both`: one run trains both PRMs on the same solutions
    and judges both on the same held-out samples against the checker (`prm_*` and `prm_ms_*`), the cheaper
    way to compare them; best-of-N and tree search read prm-ms/ as the reward model kind `prm-ms`. With
    Math-Shepherd labels the summary also has `mc_label_agreement`: the share of training steps whose MC
    label (read right when > 0.5) equals the checker's, and `mc_labels` with the detail.
    """
    if cfg.data:
        require_checker_labels(cfg, "--data")
        return run_on_preferences(cfg, read_preferences(cfg.data), resume)
    out = prepare_output(cfg.output_dir, resume)
    policy, tokenizer = load_model(policy_path(cfg.model))
    if uses_chat_world(tokenizer, cfg.data):
        require_checker_labels(cfg, "a chat model (bare answers, no steps)")
        return run_on_chat_world(cfg, policy, tokenizer, out, resume)
    train_set = sample_solutions(policy, tokenizer, cfg, "train", cfg.train_problems, cfg.samples)
    outcomes = rollout_outcomes(policy, tokenizer, cfg, train_set) if cfg.prm_labels != "checker" else None
    pool = sample_solutions(policy, tokenizer, cfg, "test", cfg.test_problems, cfg.hacking_samples)
    test = first_of_each(pool, cfg.test_samples)
    _, baseline = likelihood_baseline(policy, tokenizer, test)
    del policy
    orm, orm_run = train_orm(cfg, triples(correctness_pairs(train_set)), "orm", out, resume, cfg.orm_bce_weight)
    prms = train_prms(cfg, train_set, outcomes, out, resume)
    # the flawed rater's preferences alone: it never sees the verifier (no BCE on correctness)
    proxy, proxy_run = train_orm(dataclasses.replace(cfg, steps=cfg.proxy_steps), triples(length_biased_pairs(train_set)),
                                 "proxy", out, resume)

    orm_eval = evaluate_orm(orm, test)
    prm_eval, prm_scores = evaluate_prms(prms, test, out)
    hacking = hacking_experiment(cfg, proxy, orm, pool)
    saved = {"orm": orm, **{name: prm for name, (prm, _) in prms.items()}, "proxy": proxy}
    for name, rm in saved.items():
        rm.save(out / name)
    reward_histograms(test, {"ORM reward": orm_eval.pop("_scores"), **prm_scores}, out / "reward_distributions.png")
    hacking_plot(hacking, out / "reward_hacking.png")

    correct = [s.correct for s in test]
    labels = mc_label_report(train_set, outcomes, cfg.mc_label) if outcomes is not None else {}
    metrics = {**orm_eval, **prm_eval, **labels, "accuracy": orm_eval["orm_pair_accuracy"], "hacking": hacking,
               "train_solutions": len(train_set), "train_solution_accuracy": sum(s.correct for s in train_set) / len(train_set),
               "test_solutions": len(test), "test_solution_accuracy": sum(correct) / len(correct)}
    time_s = orm_run.time_s + sum(r.time_s for _, r in prms.values()) + proxy_run.time_s
    result = TrainResult(orm_run.history, orm_run.final_metrics, time_s, orm_run.tokens_per_s)
    return write_summary(out, "reward", cfg, metrics, baseline, orm, result,
                         reward_models={name: str(out / name) for name in saved})


def run_on_chat_world(cfg: RewardConfig, policy, tokenizer, out: Path, resume: bool) -> dict:
    """An ORM on a chat model's own replies to world additions asked in words, pairs labelled by the verifier
    (the outcome reward model best-of-N selects with on that model). The replies are bare answers: no
    steps, so no PRM, and no length-biased proxy (their lengths hardly differ)."""
    train_set = chat_solutions(policy, tokenizer, cfg, "train", cfg.train_problems, cfg.samples)
    test = chat_solutions(policy, tokenizer, cfg, "test", cfg.test_problems, cfg.test_samples)
    likelihood, baseline = likelihood_baseline(policy, tokenizer, test)
    del policy
    pairs = triples(correctness_pairs(train_set))
    orm, orm_run = train_orm(cfg, pairs, "orm", out, resume, cfg.orm_bce_weight)
    orm_eval = evaluate_orm(orm, test)
    orm.save(out / "orm")
    orm_scores = orm_eval.pop("_scores")
    reward_histograms(test, {"ORM reward": orm_scores, "policy mean token log-prob": likelihood},
                      out / "reward_distributions.png")
    correct = [s.correct for s in test]
    metrics = {**orm_eval, "accuracy": orm_eval["orm_pair_accuracy"], "train_pairs": len(pairs),
               "train_solutions": len(train_set), "train_solution_accuracy": sum(s.correct for s in train_set) / len(train_set),
               "test_solutions": len(test), "test_solution_accuracy": sum(correct) / len(correct)}
    return write_summary(out, "reward", cfg, metrics, baseline, orm, orm_run, reward_models={"orm": str(out / "orm")})


def preference_accuracy(rm: RewardModel, held: list) -> float:
    """Share of held-out preference records with score(chosen) > score(rejected) (ties count 1/2)."""
    prompts = [r.prompt for r in held]
    chosen, rejected = rm.score(prompts, [r.chosen for r in held]), rm.score(prompts, [r.rejected for r in held])
    return sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected)) / len(held)


def run_on_preferences(cfg: RewardConfig, records: list, resume: bool) -> dict:
    """An ORM on the user's preference pairs; held-out preference accuracy on at most `eval_pairs` of a seeded
    10% of them, before (the ORM as initialised, from the same seed as the one trained) and after training."""
    out = prepare_output(cfg.output_dir, resume)
    train_records, held = split_records(records, cfg.seed, cfg.eval_pairs)
    pairs = [((r.prompt, r.chosen, None), (r.prompt, r.rejected, None)) for r in train_records]

    torch.manual_seed(cfg.seed)  # train_orm's initialisation
    start = preference_accuracy(new_reward_model(policy_path(cfg.model), "orm", head=cfg.head), held)
    baseline = {"accuracy": start, "preference_accuracy": start, "scorer": "untrained head"}
    orm, orm_run = train_orm(cfg, pairs, "orm", out, resume)  # no correctness labels: Bradley-Terry alone

    orm.save(out / "orm")
    accuracy = preference_accuracy(orm, held)
    metrics = {"accuracy": accuracy, "preference_accuracy": accuracy, "orm_pair_accuracy": accuracy,
               "held_out_pairs": len(held), "train_pairs": len(pairs)}
    return write_summary(out, "reward", cfg, metrics, baseline, orm, orm_run,
                         reward_models={"orm": str(out / "orm")})


def trained_reward_models(quick: bool = False, model: str | None = None) -> Path:
    """The cached reward stage (orm/, prm/, proxy/ inside) on the shared policy, or on `model` with its preset
    (the stage the real-model track runs); runs it on first use."""
    from posttrain.stages import cached_run, stage_overrides

    return cached_run("reward", stage_overrides("reward", quick, model))
