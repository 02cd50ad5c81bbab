"""What every training stage needs around an unchanged model: DeepSpeed engine setup, the LR schedule, checkpoints
with exact resume, the loss guard, and FLOP accounting.

Distribution is applied here and only here (the model file knows nothing of it): the process group comes from
Ray Train (gloo on CPU, nccl on GPU), DeepSpeed wraps the model with ZeRO stage 0-3 (optionally offloading to
CPU), bf16 where the hardware has it and fp32 otherwise.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptline.model.gpt import GPT
from pipeline.artifacts import NodeMirror


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9  # LLaMA's AdamW betas
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def validate(self) -> list[tuple[str, str]]:
        if self.lr <= 0:
            return [("lr", f"must be > 0, got {self.lr}")]
        if not 0 <= self.min_lr_ratio <= 1:
            return [("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")]
        return [] if self.warmup_steps >= 0 else [("warmup_steps", "must be >= 0")]


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU
    offload_params: bool = False  # ZeRO-Infinity-style parameter offload (stage 3 only)
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 otherwise; or bf16 / fp32

    def validate(self) -> list[tuple[str, str]]:
        if self.zero_stage not in (0, 1, 2, 3):
            return [("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")]
        if self.offload_params and self.zero_stage != 3:
            return [("offload_params", "needs zero_stage 3")]
        return [] if self.precision in ("auto", "bf16", "fp32") else [("precision", "must be auto, bf16 or fp32")]


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def use_bf16(cfg: DeepSpeedConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


def deepspeed_config(cfg: DeepSpeedConfig, micro_batch: int, grad_accum: int, grad_clip: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # DeepSpeed refuses an offloaded optimizer that is not its own CPU Adam; ours (torch's fused AdamW) is also
        # one vectorized CPU kernel per tensor, so the offloaded step runs where and as fast as intended.
        "zero_force_ds_cpu_optimizer": not cfg.offload_optimizer,
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and embeddings), not norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_deepspeed(model: GPT, optim: OptimConfig, ds: DeepSpeedConfig, micro_batch: int, grad_accum: int):
    """A DeepSpeed engine over the model, on the process group Ray Train started."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    weights_only_loads()
    # The fused kernel (CPU and GPU): one pass per tensor instead of a dozen ops, ~7x faster for the tiny model on CPU
    # and the default of transformers' Trainer.
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        fused=True,
    )  # fmt: skip
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(ds, micro_batch, grad_accum, optim.grad_clip)
    )
    return engine, optimizer


def compile_blocks(model: torch.nn.Module) -> None:
    """`torch.compile` every transformer block in place (torchtitan's per-block compile): Inductor fuses the norms,
    rotary embedding, SwiGLU gate and residual adds around the matmuls, which on CPU and for small models are a
    third of a step. Parameter names, checkpoints and the model file stay as they are. The blocks compile on the
    first training step (seconds with Inductor's on-disk cache warm, about half a minute cold); decoding runs
    eager (`torch.compiler.set_stance("force_eager")` around it), its one-position steps not worth a second graph."""
    for block in model.layers:
        block.compile()


def weights_only_loads() -> None:
    """Every `torch.load` in this process with `weights_only=True`, even where DeepSpeed passes False (its
    checkpoint engine, `zero_to_fp32`): a checkpoint may hold tensors, plain containers and numbers, and the few
    DeepSpeed classes allowlisted here (its loss scalers, plain attributes; its ZeRO stage enum; the (numel, start)
    record of a parameter fragment), never an arbitrary pickled object, so a tampered checkpoint cannot run code
    when a run resumes from it. Our own client state (RNG states included) is plain data for the same reason."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---- checkpoints ------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator's state as plain data (numpy's key array as a list), loadable with weights_only=True."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, keys.tolist(), int(position), int(has_gauss), float(gauss)]
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def checkpoint_file_rank(name: str) -> int | None:
    """The rank that writes a DeepSpeed checkpoint file (its ZeRO partition: `zero_pp_rank_<r>_...`), or None for
    the files rank 0 writes for everyone (`mp_rank_00_model_states.pt` under ZeRO-1/2, `zero_to_fp32.py`)."""
    match = re.search(r"zero_pp_rank_(\d+)_", name)
    return int(match.group(1)) if match else None


class Checkpoints:
    """DeepSpeed checkpoints under `<dir>/step-<n>/`, the newest `keep` kept; `latest` names the last complete one.

    With an enabled `mirror` (an object store; workers on several nodes, each with its own copy of the directory)
    the store's copy is the one that counts: after each save every rank uploads the files it wrote, and once all have
    (a barrier) rank 0 uploads `latest` and prunes old steps there, so the store never names an incomplete
    checkpoint. Loading reads `latest` from the store and downloads what this rank reads: the shared files and its
    own partition (never the other ranks' optimizer states). `download_all` fetches a whole checkpoint (rank 0 does,
    to consolidate ZeRO-3 weights)."""

    def __init__(self, directory: Path, keep: int, mirror: NodeMirror | None = None):
        self.directory, self.keep, self.mirror = directory, keep, mirror or NodeMirror()
        self.rel = os.path.relpath(directory, self.mirror.workdir) if self.mirror.enabled else ""

    def latest(self) -> str | None:
        if self.mirror.enabled:
            text = self.mirror.read_text(f"{self.rel}/latest")
            return text.strip() if text else None
        marker = self.directory / "latest"
        return marker.read_text().strip() if marker.exists() else None

    def save(self, engine, step: int, client_state: dict[str, Any]) -> None:
        tag = f"step-{step:08d}"
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=True)
        rank = engine.global_rank
        if self.mirror.enabled:
            writers = {name: checkpoint_file_rank(name) for name in sorted(os.listdir(self.directory / tag))}
            mine = [name for name, writer in writers.items() if writer == rank or (writer is None and rank == 0)]
            self.mirror.push([f"{self.rel}/{tag}/{name}" for name in mine])
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            if rank == 0:
                self.mirror.push([f"{self.rel}/latest"])
                remote_tags = [Path(rel).name for rel in self.mirror.list(self.rel, recursive=False)]
                for old in sorted(t for t in remote_tags if t.startswith("step-"))[: -self.keep]:
                    self.mirror.delete(f"{self.rel}/{old}")
        if rank == 0 or self.mirror.enabled:  # with a mirror every node prunes its own copy
            tags = sorted(p.name for p in self.directory.glob("step-*") if p.is_dir())
            for old in tags[: -self.keep]:
                shutil.rmtree(self.directory / old, ignore_errors=True)

    def load(self, engine) -> dict[str, Any] | None:
        tag = self.latest()
        if tag is None:
            return None
        if self.mirror.enabled:
            self.download(tag, engine.global_rank)
        _, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        return client_state

    def download_all(self) -> str | None:
        """The newest checkpoint's tag, every rank's files of it fetched first (a mirror's copy is this node's)."""
        tag = self.latest()
        if self.mirror.enabled and tag is not None:
            self.download(tag, None)
        return tag

    def download(self, tag: str, rank: int | None) -> None:
        """The files of checkpoint `tag` that `rank` reads: the shared ones and its own partition (every file when
        `rank` is None), fetched again even when present (a rollback may have rewritten a step's files since)."""
        files = self.mirror.list(f"{self.rel}/{tag}")
        self.mirror.pull([rel for rel in files if rank is None or checkpoint_file_rank(Path(rel).name) in (None, rank)])


# ---- loss guard -------------------------------------------------------------------------------------------------
@dataclass
class GuardConfig:
    z_score: float = 6.0  # a loss this many standard deviations above the running mean is a spike
    window: int = 50  # accepted micro-batch losses the mean and deviation are taken over
    max_consecutive: int = 3  # this many bad micro-batches in a row roll back to the last checkpoint

    def validate(self) -> list[tuple[str, str]]:
        if self.window < 4 or self.z_score <= 0 or self.max_consecutive < 1:
            return [("window", "needs window >= 4, z_score > 0, max_consecutive >= 1")]
        return []


class LossGuard:
    """Judges each micro-batch's loss (already averaged over ranks, so every rank decides alike) before its
    backward pass: a bad one is never applied. Non-finite losses and spikes beyond `z_score` over the window of
    accepted losses are bad; `max_consecutive` bad ones in a row call for a rollback."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive = self.skipped = self.rollbacks = 0

    def judge(self, loss: float) -> str | None:
        reason = None
        if not math.isfinite(loss):
            reason = "nonfinite"
        elif len(self.history) >= self.cfg.window // 2:
            mean, std = float(np.mean(self.history)), float(np.std(self.history))
            if loss > mean + self.cfg.z_score * max(std, 1e-3 * abs(mean), 1e-8):
                reason = "spike"
        if reason is None:
            self.history.append(loss)
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.skipped += 1
        return reason

    def must_roll_back(self) -> bool:
        return self.consecutive >= self.cfg.max_consecutive

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.skipped, self.rollbacks = state["skipped"], state["rollbacks"]


# ---- FLOPs --------------------------------------------------------------------------------------------------
def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus attention's 12·L·d·T (PaLM, app. B)."""
    cfg = model.cfg
    return 6 * model.num_params(embeddings=False) + 12 * cfg.n_layers * cfg.dim * seq_len


def measured_peak_flops(threads: int | None = None, size: int = 1024, repeats: int = 10) -> float:
    """fp32 matmul throughput (FLOP/s) with `threads` threads (default: the current setting), best of several runs:
    the CPU's practical peak. Measure it where nothing else competes for the cores (the stage measures in the
    driver, before its workers start), or a busy moment passes for the peak and MFU reads high."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)
    return 2 * size**3 / best
