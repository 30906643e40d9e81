"""LoRA, low-rank adaptation (Hu et al. 2021), written out by hand.

A frozen linear layer y = W x gets a trainable low-rank detour (Eq. 3 of the paper):

    y = W x + (alpha / r) * B A dropout(x)        W: (out, in) frozen
                                                   A: (r, in)   Kaiming-uniform, trainable
                                                   B: (out, r)  zeros, trainable

B starts at zero, so the adapted model starts exactly at the base model; only r * (in + out)
numbers per layer are trained instead of in * out. alpha / r keeps the update's scale comparable
across ranks. After training the detour folds into the weight, W' = W + (alpha / r) B A
(`merge`), and costs nothing at inference; `unmerge` takes it back out.

GPT-2 and its kin build their projections from transformers' `Conv1D`, a linear layer whose weight
is stored transposed, W: (in, out) and y = x W + b. It gets the same A and B; only merging adds the
update transposed, (alpha / r) (B A)^T. PEFT calls such a layer `fan_in_fan_out`.

Adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, keys
like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
`peft.PeftModel.from_pretrained(base, folder)` loads what we train, and `load_adapter` loads what
PEFT trains (plain LoRA: no DoRA, no bias, no per-layer rank patterns).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from posttrain.errors import UserError, where
from posttrain.io import atomic_dir, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the model twice: PeftModel.base_model (LoraModel).model


@dataclasses.dataclass
class AdapterConfig:
    """For methods that can train a LoRA update of the policy instead of every weight: their configs list
    it before TrainingConfig, whose validate() it runs after its own check."""

    lora_r: int = 0  # rank of a LoRA update of the lora_targets layers, trained instead of every weight (0: off)
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_r
    # linear layers that get adapters, by the last part of their names
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> None:
        if self.lora_r < 0:
            raise UserError(f"lora_r must be >= 0 (0: train every weight), got {self.lora_r}")
        super().validate()


ADAPTABLE = (nn.Linear, Conv1D)  # the layers LoRA wraps


def features(layer: nn.Linear | Conv1D) -> tuple[int, int]:
    """(in, out) of a linear layer: nn.Linear stores W as (out, in), Conv1D as (in, out)."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` or `Conv1D` plus the scaled low-rank update (alpha / r) B A on a dropped-out input."""

    def __init__(self, base: nn.Linear | Conv1D, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.fan_in_fan_out = isinstance(base, Conv1D)  # its weight is (in, out): merging adds the update transposed
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        in_features, out_features = features(base)
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        a = torch.empty(r, in_features)  # (r, in), drawn on the CPU: the same numbers on every device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own init, as PEFT does
        self.lora_A = nn.Parameter(a.to(**like))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **like))  # (out, r): zero, so B A = 0 at the start
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.enabled = True  # False inside `disabled`: the layer is the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged or not self.enabled:  # the update already lives in the weight, or is switched off
            return y
        low_rank = self.dropout(x) @ self.lora_A.T  # (..., r)
        return y + self.scaling * (low_rank @ self.lora_B.T)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, shape (out, in): the update of an (out, in) weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def weight_update(self) -> torch.Tensor:
        """What merging adds to the base weight, in its layout: delta_weight, transposed for a Conv1D."""
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.weight_update()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.weight_update()
            self.merged = False


def inject(model: nn.Module, target_modules: list[str], r: int, alpha: float, dropout: float = 0.0, *,
           seed: int = 0) -> nn.Module:
    """Freeze every parameter of `model`, then wrap each nn.Linear or Conv1D named in `target_modules`
    (the last part of its module name, e.g. `q_proj`, GPT-2's `c_attn`) in a LoRALinear whose A and B
    are trainable.

    The A matrices are drawn from a generator seeded with `seed`, layer after layer, so the adapters
    depend on the seed alone, not on whatever drew random numbers before (a baseline's sampling, say,
    which differs between one process and several)."""
    if r < 1:
        raise UserError(f"LoRA rank r must be >= 1, got {r}")
    model.requires_grad_(False)
    adaptable = [(name, module) for name, module in model.named_modules() if isinstance(module, ADAPTABLE)]
    targets = [(name, module) for name, module in adaptable if name.rsplit(".", 1)[-1] in target_modules]
    found = {name.rsplit(".", 1)[-1] for name, _ in targets}
    if missing := sorted(set(target_modules) - found):
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in adaptable})
        raise UserError(f"LoRA target modules {missing} match no linear layer (nn.Linear or Conv1D); this model's "
                        f"are {names}: set lora_targets to some of them")
    generator = torch.Generator().manual_seed(seed)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, r, alpha, dropout, generator))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block `model` is its base model: every LoRA update switched off. RL methods use it as
    the frozen reference policy without keeping a second copy of the weights (the adapters start at
    B = 0, so the base is where training started)."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers to switch off (inside the block it would be itself)")
    if any(layer.merged for layer in layers):
        raise ValueError("cannot switch off merged LoRA layers: unmerge them first")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every update into its weight and put the plain layer back: an ordinary HF model."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


@torch.no_grad()
def adaptation_magnitudes(model: nn.Module) -> dict[str, float]:
    """||(alpha / r) B A||_F / ||W||_F per adapted layer: how far training has moved each weight."""
    return {name: (layer.delta_weight().norm() / layer.base_layer.weight.norm()).item()
            for name, layer in lora_layers(model).items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (PEFT stores A and B as `lora_A.weight`, `lora_B.weight`)."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    return state


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as PEFT 0.21 does (plain LoRA subset)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),  # PEFT's flag for Conv1D
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with atomic_dir(directory) as tmp:
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(adapter_state(model), str(Path(tmp) / WEIGHTS_FILE), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject LoRA layers as described by a PEFT adapter folder and load its weights into them."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists() or not (directory / WEIGHTS_FILE).exists():
        raise UserError(f"'{directory}' is not a LoRA adapter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_json(config_path)
    # Plain LoRA only: these PEFT options change the maths or the layout, so refuse rather than misload.
    # (fan_in_fan_out follows each layer's type, as PEFT makes it do, so it is not checked.)
    for field, supported in (("peft_type", "LORA"), ("use_dora", False), ("bias", "none"), ("rank_pattern", {}),
                             ("alpha_pattern", {}), ("use_rslora", False)):
        if config.get(field, supported) != supported:
            raise UserError(f"{where(config_path, field=field)} is {config[field]!r}; "
                            f"only plain LoRA ({field}={supported!r}) is supported")
    if not isinstance(config.get("target_modules"), list):
        raise UserError(f"{where(config_path, field='target_modules')} must be a list of module names "
                        "(regex strings are not supported)")
    inject(model, list(config["target_modules"]), config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    expected = adapter_state(model)
    saved = load_file(str(directory / WEIGHTS_FILE))
    if set(saved) != set(expected):
        extra, missing = sorted(set(saved) - set(expected)), sorted(set(expected) - set(saved))
        raise UserError(f"{directory / WEIGHTS_FILE} does not fit this model: "
                        f"unexpected keys {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(saved[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(saved[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return model
