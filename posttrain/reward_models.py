"""Reward models: a transformer backbone with a scalar head, and the one loader every user of them calls.

    tokens ──► backbone (a causal LM without its LM head) ──► hidden (B, T, d) ──► head ──► values (B, T)

    ORM (outcome):  r(x, y) = values at the last real token of prompt + completion + EOS
    PRM (process):  one logit per reasoning step, at the token that ends the step's line (its newline),
                    plus one at the last token for the answer; score = min or product of sigmoid(logits)

Positions are counted over real tokens only (as the sampler does), so a row's values do not depend
on whether the batch is padded on the left or the right.

On disk a reward model is an ordinary folder: the backbone and tokenizer via `save_pretrained`
(loadable with `AutoModel.from_pretrained`), `head.safetensors` (the head's weight and bias) and
`reward_model.json` (kind, aggregate). `load_reward_model(path)` is the single entry point used by
best-of-N, tree search and PPO/GRPO; `score(prompts, completions)` and `step_scores(...)` are its API.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.data import encode_prompt, pad_batch
from posttrain.errors import UserError
from posttrain.io import atomic_dir, read_json, write_json
from posttrain.losses.reward import AGGREGATES
from posttrain.models import resolve_model_path
from posttrain.world import COT_TRIGGER

SPEC, HEAD = "reward_model.json", "head.safetensors"
KINDS = ("orm", "prm")


@dataclasses.dataclass
class Encoded:
    """One prompt + completion as token ids, and the indices of the tokens a PRM reads."""

    ids: list[int]
    steps: list[int]  # token index ending each reasoning step (then the last token, when `final`)


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
    return Encoded(ids, steps + ([len(ids) - 1] if final else []))


def collate(rows: list[Encoded], pad_id: int) -> dict:
    """Right-padded input_ids/attention_mask (B, T), and step indices with their mask (B, S)."""
    batch = pad_batch([(r.ids, r.ids) for r in rows], pad_id)
    del batch["labels"]  # a reward model predicts no tokens
    width = max(1, max(len(r.steps) for r in rows))
    batch["steps"] = torch.tensor([r.steps + [0] * (width - len(r.steps)) for r in rows])
    batch["step_mask"] = torch.tensor([[1] * len(r.steps) + [0] * (width - len(r.steps)) for r in rows])
    return batch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,): index of each row's last real token, for left and right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(-1)


class RewardModel(nn.Module):
    """A backbone and a linear head giving one value per position; `kind` says how values are read."""

    def __init__(self, backbone, tokenizer, kind: str = "orm", aggregate: str = "min"):
        super().__init__()
        if kind not in KINDS or aggregate not in AGGREGATES:
            raise UserError(f"reward model kind must be one of {KINDS} and aggregate one of {tuple(AGGREGATES)}")
        self.backbone, self.tokenizer, self.kind, self.aggregate = backbone, tokenizer, kind, aggregate
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))  # TRL's init: rewards start near 0
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values (B, T): the head applied to the last hidden state at every position."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: padding side is irrelevant
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def rewards(self, batch: dict) -> torch.Tensor:
        """(B,): the value at each row's last real token (the ORM's reward)."""
        values = self(batch["input_ids"], batch["attention_mask"])
        return values.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)

    def step_logits(self, batch: dict) -> torch.Tensor:
        """(B, S): the values at each row's step tokens (padding steps hold junk; see step_mask)."""
        return self(batch["input_ids"], batch["attention_mask"]).gather(1, batch["steps"])

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str], batch_size: int = 128) -> list[float]:
        """One score per solution: ORM reward, or PRM aggregate of step probabilities (in [0, 1])."""
        scores = []
        for batch in self._batches(prompts, completions, True, batch_size):
            if self.kind == "orm":
                scores += self.rewards(batch).tolist()
            else:
                probs = torch.sigmoid(self.step_logits(batch))
                scores += AGGREGATES[self.aggregate](probs, batch["step_mask"]).tolist()
        return scores

    @torch.no_grad()
    def step_scores(self, prompts: list, completions: list[str], batch_size: int = 128) -> list[list[float]]:
        """P(step is right) for each reasoning step written so far (partial solutions welcome)."""
        out = []
        for batch in self._batches(prompts, completions, False, batch_size):
            probs = torch.sigmoid(self.step_logits(batch))
            out += [p[m.bool()].tolist() for p, m in zip(probs, batch["step_mask"])]
        return out

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
            write_json(Path(tmp) / SPEC, {"kind": self.kind, "aggregate": self.aggregate})


def new_reward_model(model_name: str, kind: str, aggregate: str = "min") -> RewardModel:
    """A fresh head on the backbone of causal LM `model_name` (e.g. the policy: it already reads the task)."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve_model_path(model_name)
    backbone = AutoModel.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    return RewardModel(backbone, AutoTokenizer.from_pretrained(source), kind, aggregate)


def load_reward_model(path: str | Path) -> RewardModel:
    """The reward model saved in folder `path` (by `RewardModel.save`), ready to score, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    if not (path / SPEC).exists():
        raise UserError(f"'{path}' is not a reward model folder (expected {SPEC}, {HEAD} and a backbone)")
    spec = read_json(path / SPEC)
    backbone = AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    model = RewardModel(backbone, AutoTokenizer.from_pretrained(path), spec["kind"], spec["aggregate"])
    model.head.load_state_dict(load_file(str(path / HEAD)))
    return model.eval()

