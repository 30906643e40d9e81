"""Reward models: a transformer with a scoring head, and the one loader every user of them calls.

Both heads give a value at every position, v (B, T); how the values are read is the model's `kind`:

    ORM (outcome):  r(x, y) = v at the last real token of prompt + completion + EOS
    PRM (process):  one logit per reasoning step, v at the token that ends the step's line (its newline),
                    plus one at the last token for the answer; score = min or product of sigmoid(logits)

Two heads (`head`):

    value       tokens -> backbone (a causal LM without its LM head) -> hidden (B, T, d) -> linear -> v
                the classic scalar head (Ouyang et al. 2022; Lightman et al. 2023)
    likelihood  v_t = bias + beta * sum_{s <= t, s in completion} (log pi(y_s | x, y_<s) - log_ref)
                pi is the full causal LM (fine-tuned with the head); beta, log_ref and bias are three
                learned scalars. This is the implicit PRM of Yuan et al. 2024 ("Free process rewards
                without process labels": q_t = beta * sum log pi/pi_ref) with a uniform reference
                (log pi_ref = log_ref on every token): a step is judged by how likely the model finds
                every token written up to its end, read exactly where a wrong token appears.

Why two: the likelihood head starts from the policy's own token probabilities, so it can judge a
step as soon as it is trained; a scalar head must learn its features from the labels. The gap is
widest where catching a mistake means re-reading the prompt (a misread operand digit), which the
likelihood head already does to predict the next token.

Positions are counted over real tokens only (as the sampler does), so a row's values do not depend
on whether the batch is padded on the left or the right.

On disk a reward model is an ordinary folder with its tokenizer and `reward_model.json` (kind,
aggregate, head), in one of two layouts:

    classifier  a value head: the `*ForSequenceClassification` model TRL's RewardTrainer writes, the
                backbone plus the head as its bias-free `score` layer, num_labels=1, pad_token_id set, so
                `AutoModelForSequenceClassification.from_pretrained(folder)` loads it and its logits (read
                at the last non-pad token) are the ORM's rewards. Exact when the pad token differs from EOS:
                where they coincide, transformers reads the token before the final EOS instead.
    backbone    the likelihood head, which has no classifier form (it reads token log-probs, so its
                transformer keeps its LM head): the transformer via `save_pretrained` (loadable with
                `AutoModelForCausalLM`) and `head.safetensors` (the three scalars). Value heads with a
                bias are kept in this layout too (`AutoModel` for the backbone); a classifier has none.

`load_reward_model(path)` reads both, and a TRL reward model folder without `reward_model.json` (an
ORM); it is the single entry point used by best-of-N, tree search and PPO/GRPO;
`score(prompts, completions)` and `step_scores(...)` are its API.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.data import encode_prompt, pad_batch
from posttrain.errors import UserError
from posttrain.generation import labelled_token_logprobs
from posttrain.io import atomic_dir, read_json, write_json
from posttrain.losses.reward import AGGREGATES
from posttrain.losses.sft import IGNORE
from posttrain.models import default_device, resolve_model_path
from posttrain.world import COT_TRIGGER

SPEC, HEAD = "reward_model.json", "head.safetensors"
KINDS = ("orm", "prm")


@dataclasses.dataclass
class Encoded:
    """One prompt + completion as token ids, and the indices of the tokens a PRM reads."""

    ids: list[int]
    steps: list[int]  # token index ending each reasoning step (then the last token, when `final`)
    prompt_len: int  # ids[prompt_len:] is the completion (and EOS)


def step_end_chars(completion: str) -> list[int]:
    """Character index of the newline ending each reasoning step (`world.completion_steps`' steps).

    A step on the last line (a truncated completion) ends at its own last character instead.
    """
    ends, start = [], 0
    for line in completion.split("\n"):
        end = start + len(line)  # where this line's newline is (or would be)
        text = line.strip()
        if text.startswith("A:"):
            break
        if text and text != COT_TRIGGER:
            ends.append(min(end, len(completion) - 1))
        start = end + 1
    return ends


def encode(tokenizer, prompt, completion: str, final: bool = True) -> Encoded:
    """Token ids of prompt + completion (+ EOS when `final`), and the PRM's read-out positions.

    The completion is tokenized on its own, as `data.encode_pair` and the sampler do, and each
    step's newline is located through the tokenizer's character offsets, so any fast tokenizer works.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    tokens = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    ids = prompt_ids + tokens["input_ids"] + ([tokenizer.eos_token_id] if final else [])
    spans = tokens["offset_mapping"]
    steps = [len(prompt_ids) + next(i for i, (s, e) in enumerate(spans) if s <= c < e) for c in step_end_chars(completion)]
    return Encoded(ids, steps + ([len(ids) - 1] if final else []), len(prompt_ids))


def collate(rows: list[Encoded], pad_id: int) -> dict:
    """Right-padded input_ids/attention_mask/completion_mask (B, T), step indices and their mask (B, S)."""
    batch = pad_batch([(r.ids, r.ids) for r in rows], pad_id)
    del batch["labels"]  # a reward model predicts no tokens
    batch["completion_mask"] = torch.tensor([[0] * r.prompt_len + [1] * (len(r.ids) - r.prompt_len)
                                             + [0] * (batch["input_ids"].shape[1] - len(r.ids)) for r in rows])
    width = max(1, max(len(r.steps) for r in rows))
    batch["steps"] = torch.tensor([r.steps + [0] * (width - len(r.steps)) for r in rows])
    batch["step_mask"] = torch.tensor([[1] * len(r.steps) + [0] * (width - len(r.steps)) for r in rows])
    return batch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,): index of each row's last real token, for left and right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(-1)


def at_last_token(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B,): the value at each row's last real token (the ORM's reward)."""
    return values.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)


def at_steps(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, S): the values at each row's step tokens (padding steps hold junk; see step_mask)."""
    return values.gather(1, batch["steps"])


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens only: the padding side does not change a row's values."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class RewardModel(nn.Module):
    """A transformer and a head giving one value per position; `kind` says how the values are read.

    Subclasses define the head: `forward(batch) -> values (B, T)`, `head_name` and how `transformer` is
    loaded. The training losses call the model itself (so a DDP wrapper works) and read its values with
    `at_last_token` / `at_steps`."""

    head_name = ""
    auto_class = ""  # the transformers Auto class that loads `transformer` from a folder

    def __init__(self, transformer, tokenizer, kind: str = "orm", aggregate: str = "min"):
        super().__init__()
        if kind not in KINDS or aggregate not in AGGREGATES:
            raise UserError(f"reward model kind must be one of {KINDS} and aggregate one of {tuple(AGGREGATES)}")
        self.backbone, self.tokenizer, self.kind, self.aggregate = transformer, tokenizer, kind, aggregate

    def forward(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def rewards(self, batch: dict) -> torch.Tensor:
        return at_last_token(self(batch), batch)

    def step_logits(self, batch: dict) -> torch.Tensor:
        return at_steps(self(batch), batch)

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str], batch_size: int = 128) -> list[float]:
        """One score per solution: ORM reward, or PRM aggregate of step probabilities (in [0, 1])."""
        def score_batch(batch: dict) -> list[float]:
            if self.kind == "orm":
                return self.rewards(batch).tolist()
            return AGGREGATES[self.aggregate](torch.sigmoid(self.step_logits(batch)), batch["step_mask"]).tolist()

        return self._once_per_distinct(prompts, completions, True, batch_size, score_batch)

    @torch.no_grad()
    def step_scores(self, prompts: list, completions: list[str], batch_size: int = 128) -> list[list[float]]:
        """P(step is right) for each reasoning step written so far (partial solutions welcome)."""
        def step_probs(batch: dict) -> list[list[float]]:
            probs = torch.sigmoid(self.step_logits(batch))
            return [p[m.bool()].tolist() for p, m in zip(probs, batch["step_mask"])]

        return self._once_per_distinct(prompts, completions, False, batch_size, step_probs)

    def _once_per_distinct(self, prompts, completions, final: bool, batch_size: int, per_batch) -> list:
        """`per_batch`'s results for every (prompt, completion), computed once per distinct pair: samples of
        a policy repeat (at 82% accuracy most of a problem's samples are the one right solution)."""
        distinct = list(dict.fromkeys(zip(prompts, completions)))
        results = []
        for batch in self._batches([p for p, _ in distinct], [c for _, c in distinct], final, batch_size):
            results += per_batch(batch)
        of = dict(zip(distinct, results))
        return [of[pair] for pair in zip(prompts, completions)]

    def _batches(self, prompts, completions, final: bool, batch_size: int):
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        rows = [encode(self.tokenizer, p, c, final) for p, c in zip(prompts, completions)]
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], self.tokenizer.pad_token_id)
            yield {k: v.to(device) for k, v in batch.items()}
        self.train(was_training)

    def save(self, path: str | Path) -> None:
        with atomic_dir(Path(path)) as tmp:
            self.backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(Path(tmp) / HEAD))
            write_json(Path(tmp) / SPEC, {"kind": self.kind, "aggregate": self.aggregate, "head": self.head_name})


class ValueHeadRewardModel(RewardModel):
    """v = w . (last hidden state): the classic scalar reward head, bias-free as TRL's `score` layer is, so
    the model is exactly a `*ForSequenceClassification` (Bradley-Terry is blind to a constant, and the ORM
    reads the EOS token, whose features can carry one). `head` is given when loading one saved with a bias."""

    head_name, auto_class = "value", "AutoModel"

    def __init__(self, backbone, tokenizer, kind: str = "orm", aggregate: str = "min", head: nn.Linear | None = None):
        super().__init__(backbone, tokenizer, kind, aggregate)
        hidden = backbone.config.hidden_size
        if head is None:
            head = nn.Linear(hidden, 1, bias=False)
            nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))  # TRL's init: rewards start near 0
        self.head = head

    def forward(self, batch: dict) -> torch.Tensor:
        """(B, T): the head applied to the last hidden state at every position."""
        mask = batch["attention_mask"]
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=mask,
                               position_ids=real_positions(mask)).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def as_sequence_classifier(self):
        """A transformers `*ForSequenceClassification` sharing this model's weights: the backbone, and the
        head as `score` (num_labels=1, pad_token_id the tokenizer's: where it reads the reward)."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.backbone.config)
        config.num_labels, config.pad_token_id = 1, self.tokenizer.pad_token_id
        classifier = AutoModelForSequenceClassification.from_config(config)
        setattr(classifier, classifier.base_model_prefix, self.backbone)  # its fresh weights are dropped
        classifier.score = self.head
        return classifier

    def save(self, path: str | Path) -> None:
        """The classifier layout (see the module docstring); a head with a bias keeps the backbone layout."""
        if self.head.bias is not None:
            return super().save(path)
        with atomic_dir(Path(path)) as tmp:
            self.as_sequence_classifier().save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(Path(tmp) / SPEC, {"kind": self.kind, "aggregate": self.aggregate, "head": self.head_name})


class LikelihoodHead(nn.Module):
    """beta, log_ref and bias. Adam moves a parameter by about lr per step, and these three must move
    by ~1 in a run tuned for the transformer's lr, so each is stored divided by SCALE: in effect a
    SCALE-times larger learning rate for the head (log pi is about -0.1 per token, hence log_ref's start)."""

    SCALE = 30.0

    def __init__(self):
        super().__init__()
        self.raw = nn.Parameter(torch.tensor([1.0, -0.1, 2.0]) / self.SCALE)  # beta, log_ref, bias

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta, log_ref, bias = self.raw * self.SCALE
        return beta, log_ref, bias


class LikelihoodRewardModel(RewardModel):
    """v_t = bias + beta * sum over completion tokens up to t of (log pi(token) - log_ref); see the module docstring."""

    head_name, auto_class = "likelihood", "AutoModelForCausalLM"

    def __init__(self, lm, tokenizer, kind: str = "orm", aggregate: str = "min"):
        super().__init__(lm, tokenizer, kind, aggregate)
        self.head = LikelihoodHead()

    def forward(self, batch: dict) -> torch.Tensor:
        """(B, T) of a right-padded batch (`collate`). The output layer runs only where a completion token
        follows (`labelled_token_logprobs`): a chat template's prompt costs no vocabulary-sized logits."""
        ids = batch["input_ids"]
        labels = ids.masked_fill(batch["completion_mask"] == 0, IGNORE)  # the completion's tokens only
        scored = labelled_token_logprobs(self.backbone, {"input_ids": ids, "attention_mask": batch["attention_mask"],
                                                         "labels": labels}).logp  # (M,), row by row
        logp = scored.new_zeros(ids[:, 1:].shape).masked_scatter(labels[:, 1:] != IGNORE, scored)  # (B, T-1)
        logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)  # (B, T): log pi of token t at t
        beta, log_ref, bias = self.head()
        per_token = (logp - log_ref) * batch["completion_mask"]  # prompt and padding add nothing
        return bias + beta * per_token.cumsum(-1)


REWARD_MODELS = {cls.head_name: cls for cls in (ValueHeadRewardModel, LikelihoodRewardModel)}


def _transformer(source, head: str):
    import transformers

    if head not in REWARD_MODELS:
        raise UserError(f"reward model head must be one of {', '.join(REWARD_MODELS)}, got '{head}'")
    auto = getattr(transformers, REWARD_MODELS[head].auto_class)
    return auto.from_pretrained(source, dtype=torch.float32, use_safetensors=True)


def new_reward_model(model_name: str, kind: str, aggregate: str = "min", head: str = "likelihood") -> RewardModel:
    """A fresh head on causal LM `model_name` (e.g. the policy: it already reads the task)."""
    from transformers import AutoTokenizer

    source = resolve_model_path(model_name)
    model = REWARD_MODELS[head](_transformer(source, head), AutoTokenizer.from_pretrained(source), kind, aggregate)
    return model.to(default_device())


def load_reward_model(path: str | Path) -> RewardModel:
    """The reward model saved in folder `path`, ready to score, in eval mode: by `RewardModel.save` in
    either layout, or by TRL's RewardTrainer (a `*ForSequenceClassification`: an ORM)."""
    from transformers import AutoTokenizer

    path = Path(path)
    spec = read_json(path / SPEC) if (path / SPEC).exists() else {"kind": "orm", "aggregate": "min", "head": "value"}
    if (path / SPEC).exists() and (path / HEAD).exists():
        model = _backbone_and_head(path, spec, AutoTokenizer.from_pretrained(path))
    elif _is_sequence_classifier(path):
        model = _classifier(path, spec, AutoTokenizer.from_pretrained(path))
    else:
        raise UserError(f"'{path}' is not a reward model folder (expected {SPEC} and {HEAD} beside a transformer, "
                        "or a *ForSequenceClassification model with num_labels=1, as TRL's RewardTrainer saves)")
    return model.to(default_device()).eval()


def _backbone_and_head(path: Path, spec: dict, tokenizer) -> RewardModel:
    """The backbone layout: the transformer, and the head's parameters in HEAD."""
    head, state = spec.get("head", "value"), load_file(str(path / HEAD))
    transformer = _transformer(path, head)
    if head == "value":  # a linear head, with or without a bias
        linear = nn.Linear(transformer.config.hidden_size, 1, bias="bias" in state)
        linear.load_state_dict(state)
        return ValueHeadRewardModel(transformer, tokenizer, spec["kind"], spec["aggregate"], linear)
    model = REWARD_MODELS[head](transformer, tokenizer, spec["kind"], spec["aggregate"])
    model.head.load_state_dict(state)
    return model


def _is_sequence_classifier(path: Path) -> bool:
    config = read_json(path / "config.json") if (path / "config.json").exists() else {}
    return any(str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or [])


def _classifier(path: Path, spec: dict, tokenizer) -> ValueHeadRewardModel:
    """The classifier layout: its base model is the backbone, its `score` layer the value head."""
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    if classifier.config.num_labels != 1 or not isinstance(getattr(classifier, "score", None), nn.Linear):
        raise UserError(f"'{path}' is a {type(classifier).__name__} with {classifier.config.num_labels} labels; a "
                        "reward model has one (num_labels=1) and a linear `score` layer, as TRL's RewardTrainer saves")
    return ValueHeadRewardModel(classifier.base_model, tokenizer, spec["kind"], spec["aggregate"], classifier.score)
