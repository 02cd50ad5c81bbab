"""LoRA (Hu et al., 2021): low-rank updates beside frozen linear layers, merged back into plain weights on export.

`apply_lora` wraps every `nn.Linear` whose name ends with one of `target_modules` in a `LoRALinear` (the frozen
base plus A (r x in, Kaiming-uniform) and B (out x r, zeros), scaled by alpha / r, so training starts exactly at
the base model) and freezes every other parameter. `merge_lora` folds B·A·scale into each base weight and puts the
plain `nn.Linear` back, so the exported model has the original architecture and names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: off, every weight is trained
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> list[tuple[str, str]]:
        if self.rank < 0:
            return [("rank", f"must be >= 0, got {self.rank}")]
        if not 0 <= self.dropout < 1:
            return [("dropout", f"must be in [0, 1), got {self.dropout}")]
        return [] if self.target_modules else [("target_modules", "must name at least one module")]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=False)
        linear.weight.data = (self.base.weight + self.scale * self.lora_b @ self.lora_a).detach().clone()
        return linear


def _targets(model: nn.Module, kind: type, names: list[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if isinstance(child, kind) and (kind is LoRALinear or child_name in names):
                found.append((module, child_name, child))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Wrap the target layers; only the LoRA matrices train afterwards. Returns the number of layers wrapped."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = _targets(model, nn.Linear, cfg.target_modules)
    if not targets:
        raise ValueError(f"no linear layer is named any of {cfg.target_modules}")
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
    return len(targets)


def merge_lora(model: nn.Module) -> None:
    """Every LoRALinear back to a plain linear layer holding base + B·A·scale; all parameters trainable again."""
    for parent, name, child in _targets(model, LoRALinear, []):
        setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
