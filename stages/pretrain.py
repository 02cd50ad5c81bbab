"""pretrain: the LLaMA-style model trained on the token shards with DeepSpeed ZeRO, on a Ray Train worker group.

The stage function checks its inputs (token ids inside the tokenizer's vocabulary, the context within the model's,
enough rows for the global batch) and then starts a `TorchTrainer` of `num_workers` workers (gloo on CPU, nccl on
GPU); every worker runs `train_loop`: the same seeded initialisation, a DeepSpeed engine (ZeRO stage, offload and
precision from config), and the packed loader's slice for its rank. The global batch is config (identity); the
micro batch per worker follows from the world size and the accumulation steps, so a run on 1 worker and on 8 sees
the same rows at every optimizer step.

Every `checkpoint_every` steps the DeepSpeed checkpoint (weights, optimizer, the loader position, every RNG state,
the step) goes to `checkpoints/` inside the stage's partial directory, the last `keep_checkpoints` kept; a
restarted worker group (Ray Train `max_failures`) or a resumed run continues from the newest one and reproduces the
uninterrupted run. A loss guard judges every micro-batch before its backward pass: a non-finite loss or a spike
is skipped (never applied), and several in a row roll weights and optimizer back to the last checkpoint while the
data position moves on past the offending batches. Every `eval_every` steps: validation loss, sample generations, tokens/s and MFU (6N plus the
attention term, against the configured peak or, on CPU, the measured fp32 matmul peak). At the end rank 0 writes
consolidated fp32 weights (`model.safetensors`, also under ZeRO-3) with a Hugging Face export beside them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.checks import at_least
from pipeline.config import typed
from pipeline.dag import StageContext
from pipeline.errors import GptlineError
from pipeline.faults import fault_armed, fault_point
from stages.model.export import export
from stages.model.generate import SamplingConfig, generate
from stages.model.gpt import GPT, IGNORE_INDEX, ModelConfig
from stages.training.data import PackedLoader, TokenStream
from stages.training.engine import (
    Checkpoints,
    DeepSpeedConfig,
    GuardConfig,
    LossGuard,
    OptimConfig,
    flops_per_token,
    init_deepspeed,
    lr_at,
    measured_peak_flops,
    rng_state,
    set_lr,
    set_rng_state,
)

VERSION = 1
LOG = "train_log.jsonl"


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 300
    batch_size: int = 16  # rows per optimizer step, over all workers (global batch)
    grad_accum: int = 1
    seq_len: int = 0  # 0: the model's max_seq_len
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    sample_every: int = 150
    sample_prompts: list[str] = field(default_factory=lambda: ["The history of", "def main():", "Q: What is"])
    sample_tokens: int = 40
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False
    guard: GuardConfig = field(default_factory=GuardConfig)
    peak_flops: float = 0.0  # per worker, for MFU; 0: measure the fp32 matmul peak (CPU)

    def validate(self) -> list[tuple[str, str]]:
        keys = ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "keep_checkpoints")
        return at_least(self, 1, *keys) + at_least(self, 0, "seq_len")


def _check_inputs(cfg: PretrainConfig, tokens: Path, tokenizer: Path, world: int) -> tuple[dict, int, int]:
    """Everything that can be wrong with the inputs, found before any worker starts."""
    meta = json.loads((tokenizer / "tokenizer_meta.json").read_text())
    vocab = meta["vocab_size"]
    if cfg.model.vocab_size not in (0, vocab):
        raise GptlineError(f"pretrain.model.vocab_size={cfg.model.vocab_size} but the tokenizer has {vocab} pieces")
    stream = TokenStream(tokens / "train")
    largest = stream.max_token()
    if largest >= vocab:
        raise GptlineError(
            f"{tokens / 'train'}: token id {largest} is outside the tokenizer's vocabulary of {vocab}: the shards "
            "were not made with this tokenizer"
        )
    seq_len = cfg.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise GptlineError(
            f"pretrain.seq_len={seq_len} is longer than pretrain.model.max_seq_len={cfg.model.max_seq_len}"
        )
    per_step = world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise GptlineError(
            f"pretrain.batch_size={cfg.batch_size} is not divisible by {world} workers x grad_accum={cfg.grad_accum}"
        )
    micro = cfg.batch_size // per_step
    PackedLoader(stream, micro, seq_len, world_size=world)  # raises when the data cannot feed a global batch
    return meta, seq_len, micro


def run(cfg: PretrainConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    world = ctx.resources.num_workers
    meta, seq_len, micro = _check_inputs(cfg, inputs["tokenize"], inputs["tokenizer"], world)
    use_gpu = ctx.resources.gpus_per_worker > 0
    loop_config = {
        "config": asdict(cfg),
        "vocab_size": meta["vocab_size"],
        "special_ids": meta["special_ids"],
        "tokens": str(inputs["tokenize"]),
        "tokenizer": str(inputs["tokenizer"]),
        "out_dir": str(out_dir),
        "seq_len": seq_len,
        "micro_batch": micro,
        "threads": max(1, int(ctx.resources.cpus_per_worker)),
        "quiet": ctx.quiet,
    }
    resources = {"CPU": ctx.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = ctx.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name="pretrain", storage_path=str(out_dir / "ray_train"), failure_config=FailureConfig(max_failures=2)
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    shutil.rmtree(out_dir / "ray_train", ignore_errors=True)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the consolidated weights are the artifact
    records = [json.loads(line) for line in (out_dir / LOG).read_text().splitlines()]
    for record in records:
        ctx.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, list)}, record["step"])
    final = json.loads((out_dir / "final.json").read_text())
    return final


def train_loop(loop: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe resume, train, checkpoint, evaluate; rank 0 writes logs and weights."""
    import ray.train
    import sentencepiece as spm

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop["threads"])
    cfg: PretrainConfig = typed(PretrainConfig, loop["config"])
    model_cfg = ModelConfig(**{**asdict(cfg.model), "vocab_size": loop["vocab_size"]})
    out_dir, seq_len, micro = Path(loop["out_dir"]), loop["seq_len"], loop["micro_batch"]
    special = loop["special_ids"]

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = GPT(model_cfg)
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    engine, optimizer = init_deepspeed(model, cfg.optim, cfg.deepspeed, micro, cfg.grad_accum)
    train = PackedLoader(TokenStream(Path(loop["tokens"]) / "train"), micro, seq_len, rank, world, cfg.seed,
                         special["pad"])  # fmt: skip
    # Built once: the validation pass rewinds this loader; samples decode with this tokenizer.
    validation = PackedLoader(TokenStream(Path(loop["tokens"]) / "validation"), micro, seq_len, rank, world,
                              cfg.seed, special["pad"], shuffle=False, require_full_batch=False)  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(Path(loop["tokenizer"]) / "tokenizer.model"))
    checkpoints = Checkpoints(out_dir / "checkpoints", cfg.keep_checkpoints)
    guard = LossGuard(cfg.guard)
    step = 0
    state = checkpoints.load(engine)
    if state is not None:
        step = state["step"]
        train.load_state_dict(state["loader"])
        set_rng_state(state["rng"][rank])
        guard.load_state_dict(state["guard"])
    else:
        torch.manual_seed(cfg.seed + 1 + rank)
    log = open(out_dir / LOG, "a") if rank == 0 else None  # noqa: SIM115 (closed at the end)
    if log is not None and state is None:
        log.truncate(0)
    peak = cfg.peak_flops or measured_peak_flops()
    flops_token = flops_per_token(model, seq_len)
    tokens_per_step = cfg.batch_size * seq_len
    started, last = time.perf_counter(), None
    while step < cfg.steps:
        set_lr(optimizer, lr_at(step, cfg.steps, cfg.optim))
        losses: list[float] = []
        while len(losses) < cfg.grad_accum:
            inputs, targets = next(train)
            _, loss = engine(torch.from_numpy(inputs).to(engine.device), torch.from_numpy(targets).to(engine.device))
            if fault_armed(f"pretrain.nan_loss_{step + 1}"):  # fault tests inject a NaN here
                loss = loss * float("nan")
            mean = _mean_over_ranks(loss.detach().float())
            reason = guard.judge(mean)
            if reason is None:
                engine.backward(loss)
                engine.step()
                losses.append(mean)
                continue
            # Never applied: no backward, so DeepSpeed's gradients and counters are untouched; the next batch
            # takes its place.
            if rank == 0:
                print(f"[pretrain] step {step + 1}: {reason} loss {mean:.4g}, batch skipped", flush=True)
            if guard.must_roll_back():
                step, losses = _roll_back(engine, checkpoints, guard, rank), []
                set_lr(optimizer, lr_at(step, cfg.steps, cfg.optim))
        step += 1
        train_loss = sum(losses) / len(losses)
        now = time.perf_counter()
        seconds, last = (now - (last or started)), now
        record: dict[str, Any] = {
            "step": step,
            "loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens_per_step / seconds,
            "mfu": tokens_per_step * flops_token / seconds / (peak * world),
            "skipped_batches": guard.skipped,
            "rollbacks": guard.rollbacks,
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["val_loss"] = _validation_loss(engine, validation, cfg.eval_batches)
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            record["samples"] = _samples(engine.module, cfg, sp, special)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if not loop["quiet"] and (step % 10 == 0 or "val_loss" in record):
                extra = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
                print(f"[pretrain] step {step}/{cfg.steps} loss {train_loss:.4f}{extra} "
                      f"{record['tokens_per_s']:.0f} tok/s mfu {record['mfu']:.1%}", flush=True)  # fmt: skip
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            client = {
                "step": step,
                "loader": train.state_dict(),
                "rng": _gather_rng(world),
                "guard": guard.state_dict(),
            }
            checkpoints.save(engine, step, client)
            fault_point(f"pretrain.after_checkpoint_{step}")  # crash tests kill a worker here
    final = {"train_loss": record["loss"], "val_loss": record.get("val_loss"), "steps": step,
             "params": model.num_params(), "tokens_seen": step * tokens_per_step,
             "skipped_batches": guard.skipped, "rollbacks": guard.rollbacks}  # fmt: skip
    _write_final_weights(engine, cfg, model_cfg, out_dir, checkpoints, Path(loop["tokenizer"]), special, rank)
    if log is not None:
        log.close()
        (out_dir / "final.json").write_text(json.dumps(final) + "\n")


def _roll_back(engine, checkpoints: Checkpoints, guard: LossGuard, rank: int) -> int:
    """Weights, optimizer and RNG back to the last checkpoint; the data position stays where it is, so the
    batches since then (the offending ones among them) are skipped rather than replayed (PaLM's remedy)."""
    state = checkpoints.load(engine)
    if state is None:
        raise GptlineError(
            f"the loss guard saw {guard.consecutive} bad batches in a row before the first checkpoint; "
            "lower pretrain.optim.lr or pretrain.checkpoint_every"
        )
    set_rng_state(state["rng"][rank])
    guard.rollbacks += 1
    guard.consecutive = 0
    if rank == 0:
        print(f"[pretrain] rolled back to step {state['step']} (rollback {guard.rollbacks})", flush=True)
    return state["step"]


def _checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing around each block (wrapped here, so the model file stays plain)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def _mean_over_ranks(value: torch.Tensor) -> float:
    if torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


def _gather_rng(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, so a resumed rank continues its own stream (all ranks hold the full list)."""
    states: list[Any] = [None] * world
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    return states


@torch.no_grad()
def _validation_loss(engine, validation: PackedLoader, batches: int) -> float:
    validation.epoch, validation.step = 0, 0  # the same first batches every time
    engine.eval()
    total = torch.zeros(2)
    for _, (inputs, targets) in zip(range(batches), validation.epoch_batches(), strict=False):
        _, loss = engine(torch.from_numpy(inputs).to(engine.device), torch.from_numpy(targets).to(engine.device))
        valid = float((targets != IGNORE_INDEX).sum())
        total += torch.tensor([float(loss) * valid, valid])
    engine.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def _samples(model: GPT, cfg: PretrainConfig, sp, special: dict[str, int]) -> list[str]:
    model.eval()
    prompts = [sp.encode(p) for p in cfg.sample_prompts]
    sampling = SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=40)
    generator = torch.Generator().manual_seed(cfg.seed)
    completions = generate(model, prompts, sampling, stop_ids=[special["end_of_text"]], pad_id=special["pad"],
                           generator=generator)  # fmt: skip
    model.train()
    return [p + sp.decode(c) for p, c in zip(cfg.sample_prompts, completions, strict=True)]


def _write_final_weights(engine, cfg, model_cfg, out_dir, checkpoints, tokenizer: Path, special, rank) -> None:
    """fp32 weights gathered from every ZeRO partition, then the Hugging Face export (rank 0)."""
    if cfg.deepspeed.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        state = (
            get_fp32_state_dict_from_zero_checkpoint(str(checkpoints.directory), tag=checkpoints.latest())
            if rank == 0
            else None
        )
    else:
        state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        model = GPT(model_cfg)
        model.load_state_dict(state)
        export(model, out_dir, tokenizer, special)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
