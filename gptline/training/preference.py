"""Preference losses on pairs of answers: DPO (sigmoid, with optional label smoothing), IPO and SimPO.

Each loss reads, per pair, the policy's summed log-probability of the chosen and the rejected answer (the answer's
tokens only, given the prompt), the same two under the frozen reference model, and the answers' token counts:
- `sigmoid` (DPO, Rafailov et al. 2023): h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l));
  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). eps = `label_smoothing` > 0 is conservative DPO
  (cDPO: each label assumed flipped with probability eps).
- `ipo` (Azar et al. 2023): loss = (h - 1 / (2 beta))^2 with h taken on log-probabilities averaged over each
  answer's tokens, as TRL computes it; a squared loss that holds the margin at a target instead of pushing it up
  without end.
- `simpo` (Meng et al. 2024): reference-free and length-normalized: h = log pi(y_w) / |y_w| - log pi(y_l) / |y_l|;
  loss = -(1 - eps) log sigmoid(beta h - gamma) - eps log sigmoid(-(beta h - gamma)), gamma = `target_margin`.

The implicit reward of an answer is beta (log pi - log ref) (sigmoid, ipo; summed) or beta log pi / |y| (simpo);
a pair is ranked right when the chosen answer's is the higher. Pairs carry weights (1/C(K,2) for the pairs of a
K-way ranking) and a batch's loss is the weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass
class PreferenceLossConfig:
    kind: str = "sigmoid"  # sigmoid (DPO), ipo or simpo
    beta: float = 0.1  # DPO's and IPO's usual value; SimPO's paper uses 2 to 2.5
    label_smoothing: float = 0.0  # sigmoid and simpo: the probability a label is wrong (0: plain DPO)
    target_margin: float = 0.5  # simpo's gamma, in reward units

    @property
    def uses_reference(self) -> bool:
        return self.kind != "simpo"

    def validate(self) -> list[tuple[str, str]]:
        if self.kind not in LOSSES:
            return [("kind", f"must be one of {', '.join(LOSSES)}, got {self.kind!r}")]
        if self.beta <= 0:
            return [("beta", f"must be > 0, got {self.beta}")]
        if not 0 <= self.label_smoothing < 0.5:
            return [("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")]
        if self.label_smoothing and self.kind == "ipo":
            return [("label_smoothing", "has no meaning for ipo (a squared loss); leave it at 0")]
        return [] if self.target_margin >= 0 else [("target_margin", f"must be >= 0, got {self.target_margin}")]


@dataclass(frozen=True)
class PairLogProbs:
    """Per pair: summed log-probabilities of each answer under the policy and the reference, and answer lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class PreferenceOutput:
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor  # implicit rewards, detached
    rejected_rewards: torch.Tensor


def preference_losses(cfg: PreferenceLossConfig, p: PairLogProbs) -> PreferenceOutput:
    """Each pair's loss and implicit rewards under `cfg` (see the module docstring)."""
    eps = cfg.label_smoothing
    if cfg.kind == "simpo":
        chosen, rejected = p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens
        z = cfg.beta * (chosen - rejected) - cfg.target_margin
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return PreferenceOutput(losses, (cfg.beta * chosen).detach(), (cfg.beta * rejected).detach())
    chosen_ratio, rejected_ratio = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    if cfg.kind == "ipo":
        h = chosen_ratio / p.chosen_tokens - rejected_ratio / p.rejected_tokens
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    else:
        z = cfg.beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return PreferenceOutput(losses, (cfg.beta * chosen_ratio).detach(), (cfg.beta * rejected_ratio).detach())


def weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w); zero when the batch holds no weight (a micro-batch of empty slots)."""
    return (weight * values).sum() / weight.sum().clamp(min=1e-12)
