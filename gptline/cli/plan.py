"""`gptline plan`: what a pretraining run will cost, before it starts.

Given a model (a preset of `conf/pretrain/model/`, built on PyTorch's meta device so even 175B costs no memory,
or a bare parameter count), a token count, a GPU type and count, and a ZeRO stage, it prints:
- parameters (N);
- training FLOPs: 6·N·D (Kaplan et al. 2020: forward 2N + backward 4N per token) and, with a model shape, that
  plus attention's 12·L·d·T per token (PaLM, appendix B; the formula the pretrain stage's MFU uses);
- model-state memory per GPU for mixed-precision Adam by the ZeRO paper's formulas (Rajbhandari et al. 2020,
  sec. 5): fp16 parameters 2Ψ, fp16 gradients 2Ψ, optimizer states KΨ with K = 12 (fp32 master weights, momentum,
  variance); stage 1 divides the optimizer states by the data-parallel degree Nd, stage 2 also the gradients,
  stage 3 everything;
- activation memory per GPU (Korthikanti et al. 2022, eq. 1, no tensor parallelism): s·b·h·(34 + 5·a·s/h) bytes
  per layer, or, with activation checkpointing, each layer's input (2·s·b·h) plus one layer recomputed;
- days of training: from a measured throughput (tokens/s per GPU) when given, else at an assumed MFU of the GPU's
  dense bf16 peak.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import yaml

from gptline.model.gpt import GPT, ModelConfig
from gptline.training.engine import flops_per_token
from pipeline.config import DEFAULT_CONFIG_DIR
from pipeline.errors import ConfigError

MODEL_PRESETS = DEFAULT_CONFIG_DIR / "pretrain" / "model"
# Dense bf16/fp16 tensor-core peak (no sparsity), memory in GB.
GPUS: dict[str, tuple[float, float]] = {
    "v100": (125e12, 32),
    "a100-40gb": (312e12, 40),
    "a100-80gb": (312e12, 80),
    "l4": (121e12, 24),
    "h100": (989e12, 80),
    "h200": (989e12, 141),
}
ADAM_K = 12  # bytes of optimizer state per parameter in mixed-precision Adam
SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class Plan:
    params: float
    tokens: float
    flops_6nd: float
    flops_with_attention: float | None
    model_states_gb: dict[int, float]  # ZeRO stage (0 = plain data parallelism) -> GB per GPU
    activations_gb: float | None
    days: float
    tokens_per_gpu_s: float
    mfu: float | None


def model_states_bytes(params: float, gpus: int, stage: int, k: int = ADAM_K) -> float:
    """Parameters, gradients and optimizer states per GPU under ZeRO stage 0-3 (the ZeRO paper, figure 1)."""
    parameters, gradients, optimizer = 2 * params, 2 * params, k * params
    if stage >= 1:
        optimizer /= gpus
    if stage >= 2:
        gradients /= gpus
    if stage >= 3:
        parameters /= gpus
    return parameters + gradients + optimizer


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """Activation memory of one micro-batch, fp16, without tensor or sequence parallelism."""
    s, b, h, a = seq_len, micro_batch, cfg.dim, cfg.n_heads
    per_layer = s * b * h * (34 + 5 * a * s / h)
    if checkpointing:
        return cfg.n_layers * 2 * s * b * h + per_layer
    return cfg.n_layers * per_layer


def load_preset(name: str, vocab_size: int) -> ModelConfig:
    path = MODEL_PRESETS / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in MODEL_PRESETS.glob("*.yaml")))
        raise ConfigError(f"--model {name!r}: no such preset in {MODEL_PRESETS} (known: {known})")
    values = yaml.safe_load(path.read_text()) or {}
    return ModelConfig(**{**values, "vocab_size": values.get("vocab_size") or vocab_size})


def plan(params: float | None, cfg: ModelConfig | None, tokens: float, gpu: str, gpus: int, seq_len: int | None,
         micro_batch: int, checkpointing: bool, tokens_per_gpu_s: float | None, mfu: float) -> Plan:  # fmt: skip
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r}: one of {', '.join(GPUS)}")
    peak, _ = GPUS[gpu]
    flops_with_attention = activations = None
    if cfg is not None:
        with torch.device("meta"):
            model = GPT(cfg)
        params = float(model.num_params())
        seq_len = seq_len or cfg.max_seq_len
        per_token = flops_per_token(model, seq_len)
        flops_with_attention = per_token * tokens
        activations = activation_bytes(cfg, micro_batch, seq_len, checkpointing) / 1e9
    else:
        per_token = 6 * params
    if tokens_per_gpu_s is None:
        tokens_per_gpu_s = mfu * peak / per_token
        used_mfu: float | None = mfu
    else:
        used_mfu = tokens_per_gpu_s * per_token / peak
    return Plan(
        params=params,
        tokens=tokens,
        flops_6nd=6 * params * tokens,
        flops_with_attention=flops_with_attention,
        model_states_gb={stage: model_states_bytes(params, gpus, stage) / 1e9 for stage in range(4)},
        activations_gb=activations,
        days=tokens / (tokens_per_gpu_s * gpus) / SECONDS_PER_DAY,
        tokens_per_gpu_s=tokens_per_gpu_s,
        mfu=used_mfu,
    )


# ---- the command ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a preset of conf/pretrain/model (llama-65b, gpt3-175b, ...)")
    what.add_argument("--params", type=float, help="a bare parameter count (no shape: no attention or activations)")
    parser.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 1.4e12")
    parser.add_argument("--gpu", default="a100-80gb", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--zero", type=int, default=3, choices=range(4), help="the ZeRO stage you plan to use")
    parser.add_argument("--vocab-size", type=int, default=32000, help="for presets that leave it to the tokenizer")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's context")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward pass")
    parser.add_argument("--no-checkpointing", action="store_true", help="activations without checkpointing")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--tokens-per-gpu-s", type=float, help="a measured throughput")
    speed.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")


def run(args: argparse.Namespace) -> int:
    for key in ("tokens", "gpus", "micro_batch", "tokens_per_gpu_s", "mfu", "params"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {value}")
    cfg = load_preset(args.model, args.vocab_size) if args.model else None
    result = plan(args.params, cfg, args.tokens, args.gpu, args.gpus, args.seq_len, args.micro_batch,
                  not args.no_checkpointing, args.tokens_per_gpu_s, args.mfu)  # fmt: skip
    memory = GPUS[args.gpu][1]
    print(f"model          {args.model or 'bare parameter count'}: {result.params / 1e9:.2f}e9 parameters")
    print(f"tokens         {result.tokens:.3g}")
    print(f"FLOPs 6ND      {result.flops_6nd:.3g}")
    if result.flops_with_attention is not None:
        print(f"  + attention  {result.flops_with_attention:.3g}")
    print(f"model states per GPU ({args.gpus} x {args.gpu}, {memory:.0f} GB), mixed-precision Adam:")
    for stage, gb in result.model_states_gb.items():
        label = "no ZeRO" if stage == 0 else f"ZeRO-{stage}"
        mark = "  <- planned" if stage == args.zero else ""
        print(f"  {label:<8} {gb:10.1f} GB{'  (does not fit)' if gb > memory else ''}{mark}")
    if result.activations_gb is not None:
        how = "with" if not args.no_checkpointing else "without"
        print(f"activations    {result.activations_gb:.1f} GB per GPU (micro-batch {args.micro_batch}, {how} "
              "activation checkpointing)")  # fmt: skip
    source = "measured" if args.tokens_per_gpu_s else f"at MFU {args.mfu:.0%}"
    print(
        f"throughput     {result.tokens_per_gpu_s:.0f} tokens/s per GPU ({source}"
        + (f"; MFU {result.mfu:.1%}" if args.tokens_per_gpu_s and result.mfu is not None else "")
        + ")"
    )
    print(f"time           {result.days:.1f} days on {args.gpus} GPUs")
    return 0
