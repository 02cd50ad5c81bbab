"""What every training stage needs around an unchanged model: the DeepSpeed engine, the LR schedule, block-level
compile and activation checkpointing, safe checkpoint loading, and FLOP accounting.

Distribution is applied here and only here (the model file knows nothing of it): the process group comes from the
stage's worker group (gloo on CPU, nccl on GPU), DeepSpeed wraps the model with ZeRO stage 0-3 (optionally
offloading to CPU), in bf16 (by default on a GPU that has it; on a CPU when asked) or fp32. A group of one worker
has nothing to partition: `effective_zero_stage` then trains at stage 0 (ZeRO-2's flat buffers and partitioned
step cost about a fifth of a small model's update for nothing).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import torch

from gptline.model.gpt import GPT
from gptline.training.config import DeepSpeedConfig, OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step (or the constant lr)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def use_bf16(cfg: DeepSpeedConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


def effective_zero_stage(cfg: DeepSpeedConfig, world: int) -> int:
    """The ZeRO stage a group of `world` workers trains at: the configured one, or 0 for a single worker that does
    not offload (it has nothing to partition)."""
    offloads = cfg.offload_optimizer or cfg.offload_params
    return 0 if world == 1 and not offloads else cfg.zero_stage


def deepspeed_config(cfg: DeepSpeedConfig, micro_batch: int, grad_accum: int, grad_clip: float) -> dict[str, Any]:
    """DeepSpeed's config for `cfg` (its `zero_stage` already the effective one)."""
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


def fp32_weights(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """The engine's weights in fp32 on the CPU by state-dict name, on rank 0 (None elsewhere); below ZeRO-3, and
    called on every rank (ZeRO-1/2 gather each parameter's partitions). A bf16 engine steps an fp32 master copy of
    each trained parameter in its optimizer and computes with a bf16 copy rounded from it: the masters are the
    weights. A frozen parameter has no master: its bf16 copy is all the engine holds."""
    masters = _fp32_masters(engine, rank) if engine.bfloat16_enabled() else {}
    if rank != 0:
        return None
    state = engine.module.state_dict(keep_vars=True)
    return {name: masters.get(id(tensor), tensor).detach().float().cpu() for name, tensor in state.items()}


def _fp32_masters(engine, rank: int) -> dict[int, torch.Tensor]:
    """A bf16 engine's fp32 master of each trained parameter, by the parameter's id (complete on rank 0 only)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = engine.optimizer
    if isinstance(optimizer, FP16_UnfusedOptimizer):  # stage 0: no partitions, the two groups in parallel
        groups = zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
        return {id(p): master for low, high in groups for p, master in zip(low, high, strict=True)}
    masters = {}
    for name, p in engine.module.named_parameters():  # ZeRO-1/2: one collective a parameter, one full copy at a time
        if not p.requires_grad:
            continue
        master = safe_get_full_fp32_param(p)
        if master is None:  # the same on every rank: none is left waiting in a collective
            raise RuntimeError(f"{type(optimizer).__name__} keeps no fp32 master of {name} that DeepSpeed can gather")
        if rank == 0:
            masters[id(p)] = master.cpu()
    return masters


def compile_blocks(model: torch.nn.Module) -> None:
    """`torch.compile` every transformer block in place (torchtitan's per-block compile): Inductor fuses the norms,
    rotary embedding, SwiGLU gate and residual adds around the matmuls, which on CPU and for small models are a
    third of a step. Parameter names, checkpoints and the model file stay as they are. The blocks compile on the
    first training step (seconds with Inductor's on-disk cache warm, about half a minute cold); decoding runs
    eager (`torch.compiler.set_stance("force_eager")` around it), its one-position steps not worth a second graph."""
    for block in model.layers:
        block.compile()


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing around each block (wrapped here, so the model file stays plain)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


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


# ---- FLOPs --------------------------------------------------------------------------------------------------
def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus attention's 12·L·d·T (PaLM, app. B)."""
    cfg = model.cfg
    return 6 * model.num_params(embeddings=False) + 12 * cfg.n_layers * cfg.dim * seq_len


def measured_peak_flops(threads: int | None = None, size: int = 1024, repeats: int = 10) -> float:
    """fp32 matmul throughput (FLOP/s) with `threads` threads (default: the current setting), best of several runs:
    the CPU's practical peak. Measure it where nothing else competes for the cores (the stage measures in the
    driver, before its workers start), or a busy moment passes for the peak and MFU reads high."""
    return _peak_flops(threads or torch.get_num_threads(), size, repeats)


@functools.cache
def _peak_flops(threads: int, size: int, repeats: int) -> float:
    """Measured once a process for each setting: the peak is the machine's, and measuring again could only catch a
    busier moment."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
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
