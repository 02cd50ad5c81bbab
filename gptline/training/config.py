"""The knobs every training stage shares: optimizer and schedule, DeepSpeed, the loss guard, and the loop's cadence.

A stage's config extends `TrainConfig` (pretrain, sft, rm, dpo) or holds these pieces itself (ppo); the YAML under
`conf/` only overrides them where a stage's default differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.checks import at_least
from pipeline.errors import GptlineError
from pipeline.versioning import unversioned

SCHEDULES = ("cosine", "constant")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    schedule: str = "cosine"  # linear warmup, then cosine to lr * min_lr_ratio; or constant after the warmup
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9  # LLaMA's AdamW betas
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def validate(self) -> list[tuple[str, str]]:
        if self.lr <= 0:
            return [("lr", f"must be > 0, got {self.lr}")]
        if self.schedule not in SCHEDULES:
            return [("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")]
        if not 0 <= self.min_lr_ratio <= 1:
            return [("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")]
        return [] if self.warmup_steps >= 0 else [("warmup_steps", "must be >= 0")]


@dataclass
class DeepSpeedConfig:
    # ZeRO stage. A group of one worker has nothing to partition and trains at stage 0 whatever this says (unless it
    # offloads); the stage in effect is in the artifact's final.json.
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU
    offload_params: bool = False  # ZeRO-Infinity-style parameter offload (stage 3 only)
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 otherwise; or bf16 (a CPU too) / fp32

    def validate(self) -> list[tuple[str, str]]:
        if self.zero_stage not in (0, 1, 2, 3):
            return [("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")]
        if self.offload_params and self.zero_stage != 3:
            return [("offload_params", "needs zero_stage 3")]
        return [] if self.precision in ("auto", "bf16", "fp32") else [("precision", "must be auto, bf16 or fp32")]


@dataclass
class GuardConfig:
    z_score: float = 6.0  # a loss this many standard deviations above the running mean is a spike
    window: int = 50  # accepted micro-batch losses the mean and deviation are taken over
    max_consecutive: int = 3  # this many bad micro-batches in a row roll back to the last checkpoint

    def validate(self) -> list[tuple[str, str]]:
        if self.window < 4 or self.z_score <= 0 or self.max_consecutive < 1:
            return [("window", "needs window >= 4, z_score > 0, max_consecutive >= 1")]
        return []


@dataclass
class TrainConfig:
    """The knobs every loss-based training stage has (pretrain, sft, rm, dpo); a stage's config extends this one."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 300  # optimizer steps (stages that count epochs derive it when this is 0)
    batch_size: int = 16  # examples (rows) per optimizer step, over all workers (global batch)
    grad_accum: int = 1
    seed: int = 0
    # What is measured and how often: evaluation and samples run without gradients, samples from a generator of
    # their own, so the weights do not depend on these.
    eval_every: int = unversioned(100)
    eval_batches: int = unversioned(8)
    sample_every: int = unversioned(150)
    sample_tokens: int = unversioned(40)
    # Versioned: the loss guard's rollback returns to the last checkpoint, so where checkpoints fall can change the
    # weights of a run that rolls back. How many are kept cannot.
    checkpoint_every: int = 100
    keep_checkpoints: int = unversioned(2)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> list[tuple[str, str]]:
        keys = ("batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints")
        return at_least(self, 1, *keys) + at_least(self, 0, "steps")


def micro_batch(stage: str, cfg: TrainConfig, world: int) -> int:
    """Examples per worker per forward pass: the global batch over workers x accumulation steps."""
    per_step = world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise GptlineError(
            f"{stage}.batch_size={cfg.batch_size} is not divisible by {world} workers x grad_accum={cfg.grad_accum}"
        )
    return cfg.batch_size // per_step


def epoch_steps(stage: str, cfg: TrainConfig, examples: int, noun: str) -> int:
    """Optimizer steps of an epoch-based stage (its config has `steps` and `epochs`): `steps` when set, else
    `epochs` passes over the `examples`. Fewer than one batch holds are an error naming the stage's `batch_size`."""
    if examples < cfg.batch_size:
        raise GptlineError(f"{stage}: {examples} training {noun} cannot fill {stage}.batch_size={cfg.batch_size}")
    return cfg.steps or math.ceil(cfg.epochs * math.ceil(examples / cfg.batch_size))
