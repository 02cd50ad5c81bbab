"""The training loop every training stage shares: pretrain, sft and rm differ only in their model, batches, loss,
evaluation and samples (a `Task`); everything else happens here once.

`launch` runs a stage's worker function on a Ray Train `TorchTrainer` (gloo on CPU, nccl on GPU, `max_failures`
restarts) and, after the fit, replays the worker's log into the stage context (wandb and the run record) and
returns the worker's final metrics. Inside a worker, `fit` drives a DeepSpeed engine through `total_steps`
optimizer steps: the LR schedule, the loss guard (a non-finite or spiking micro-batch loss is skipped before its
backward pass; several in a row roll weights and optimizer back to the last checkpoint while the data position
moves on), checkpoints every `checkpoint_every` steps inside the stage's partial directory (the DeepSpeed state,
the loader position, every rank's RNG state, the guard; the last `keep_checkpoints` kept), exact resume from the
newest one, evaluation and samples on their own schedules. Asked to stop (`stop_requested`, SIGTERM under the
runner), every rank agrees on it after the current step, checkpoints there and returns; `launch` then raises
`StageStopped` and keeps the checkpoints for the resume. Rank 0 writes one JSON line per step to `train_log.jsonl`
and the last one to `final.json`. `consolidated_state` then gathers fp32 weights from every ZeRO partition for the
stage's export.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gptline.training.engine import (
    Checkpoints,
    DeepSpeedConfig,
    GuardConfig,
    LossGuard,
    OptimConfig,
    lr_at,
    rng_state,
    set_lr,
    set_rng_state,
)
from pipeline.artifacts import NodeMirror
from pipeline.checks import at_least
from pipeline.dag import STOP_REQUEST, StageContext, stop_requested
from pipeline.errors import GptlineError, StageStopped
from pipeline.faults import fault_armed, fault_point
from pipeline.progress import Progress

LOG = "train_log.jsonl"
FINAL = "final.json"
CHECKPOINTS = "checkpoints"
RAY_TRAIN = "ray_train"


@dataclass
class TrainConfig:
    """The knobs every training stage has; a stage's config extends this one."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 300  # optimizer steps (stages that count epochs derive it when this is 0)
    batch_size: int = 16  # examples (rows) per optimizer step, over all workers (global batch)
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    sample_every: int = 150
    sample_tokens: int = 40
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
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


class Resumable(Protocol):
    """A training batch source: endless, and restorable to its exact position."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(Protocol):
    """What a stage plugs into `fit`."""

    train: Resumable

    def loss(self, engine, batch: Any) -> torch.Tensor:
        """The micro-batch's scalar loss (forward only; `fit` does the backward)."""

    def tokens(self, batch: Any) -> int:
        """Tokens the batch trains on (for tokens/s)."""

    def evaluate(self, engine) -> dict[str, float]:
        """Held-out metrics, called on every rank together (collectives allowed)."""

    def samples(self, model: torch.nn.Module) -> list[str]:
        """Generations to log, called on rank 0 only with the unwrapped model."""


def worker_context() -> tuple[int, int]:
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def fit(
    stage: str,
    task: Task,
    engine,
    optimizer,
    cfg: TrainConfig,
    total_steps: int,
    out_dir: Path,
    rank: int,
    world: int,
    progress: Progress,
    extra_metrics: Callable[[float, int], dict[str, float]] | None = None,
    mirror: NodeMirror | None = None,
) -> dict[str, Any]:
    """Train to `total_steps` (resuming from the newest checkpoint if there is one); returns the last log record.
    `extra_metrics(seconds, tokens)` adds per-step figures such as MFU; `mirror` (`loop["mirror"]`) is where the
    checkpoints live when the nodes share no filesystem."""
    checkpoints = Checkpoints(out_dir / CHECKPOINTS, cfg.keep_checkpoints, mirror)
    stop_poll = StopPoll(out_dir, checkpoints.mirror, rank)
    guard = LossGuard(cfg.guard)
    step = tokens_seen = 0
    state = checkpoints.load(engine)
    if state is not None:
        step, tokens_seen = state["step"], state["tokens_seen"]
        task.train.load_state_dict(state["loader"])
        set_rng_state(state["rng"][rank])
        guard.load_state_dict(state["guard"])
    else:
        torch.manual_seed(cfg.seed + 1 + rank)
    log = open(out_dir / LOG, "a") if rank == 0 else None  # noqa: SIM115 (closed at the end)
    if log is not None and state is None:
        log.truncate(0)
    record: dict[str, Any] = {}
    last = time.perf_counter()
    bar = (progress if rank == 0 else Progress("quiet"))(total_steps, f"[{stage}] training", unit="step")
    bar.update(step)
    status: dict[str, float] = {}
    while step < total_steps:
        set_lr(optimizer, lr_at(step, total_steps, cfg.optim))
        losses: list[float] = []
        tokens = 0
        while len(losses) < cfg.grad_accum:
            batch = next(task.train)
            loss = task.loss(engine, batch)
            if fault_armed(f"{stage}.nan_loss_{step + 1}"):  # fault tests inject a NaN here
                loss = loss * float("nan")
            mean = mean_over_ranks(loss.detach().float())
            reason = guard.judge(mean)
            if reason is None:
                engine.backward(loss)
                engine.step()
                losses.append(mean)
                tokens += task.tokens(batch)
                continue
            # Never applied: no backward, so DeepSpeed's gradients and counters are untouched; the next batch
            # takes its place.
            if rank == 0:
                print(f"[{stage}] step {step + 1}: {reason} loss {mean:.4g}, batch skipped", flush=True)
            if guard.must_roll_back():
                step, losses, tokens = _roll_back(stage, engine, checkpoints, guard, rank), [], 0
                set_lr(optimizer, lr_at(step, total_steps, cfg.optim))
        step += 1
        now = time.perf_counter()
        seconds, last = now - last, now
        # One all-reduce: the step's tokens, and whether any rank has seen a stop request (so all stop together).
        tokens_sum, stop_votes = sum_over_ranks([float(tokens), float(stop_poll())])
        tokens, stop = int(tokens_sum), stop_votes > 0
        tokens_seen += tokens
        record = {
            "step": step,
            "loss": sum(losses) / len(losses),
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens / seconds,
            "skipped_batches": guard.skipped,
            "rollbacks": guard.rollbacks,
            **(extra_metrics(seconds, tokens) if extra_metrics else {}),
        }
        if step % cfg.eval_every == 0 or step == total_steps:
            record.update(task.evaluate(engine))
        if rank == 0 and (step % cfg.sample_every == 0 or step == total_steps):
            engine.module.eval()
            with torch.compiler.set_stance("force_eager"):  # decoding: compiled blocks (compile_blocks) run eager
                record["samples"] = task.samples(engine.module)
            engine.module.train()
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        status.update((k, v) for k, v in record.items() if k in ("loss", "tokens_per_s", "mfu") or k.startswith("val_"))
        bar.update(1, **status)
        if step % cfg.checkpoint_every == 0 or step == total_steps or stop:
            client = {"step": step, "tokens_seen": tokens_seen, "loader": task.train.state_dict(),
                      "rng": gather_rng(world), "guard": guard.state_dict()}  # fmt: skip
            checkpoints.save(engine, step, client)
            mirror_log(checkpoints.mirror, rank)
            fault_point(f"{stage}.after_checkpoint_{step}")  # crash tests kill a worker here
        if stop and step < total_steps:
            bar.close()
            return stopped(out_dir, step, rank, log)
    bar.close()
    if log is not None:
        log.close()
        # ZeRO-3 leaves each rank a slice of every parameter; ds_numel is the full size.
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        # Held-out figures first: the status table shows the first few.
        held_out = {k: v for k, v in record.items() if k.startswith("val_")}
        final = {**held_out, "train_loss": record["loss"], "steps": step, "params": params, "tokens_seen": tokens_seen}
        final.update((k, v) for k, v in record.items() if k not in ("step", "loss", "lr", "samples", *held_out))
        (out_dir / FINAL).write_text(json.dumps(final) + "\n")
    return record


def _roll_back(stage: str, engine, checkpoints: Checkpoints, guard: LossGuard, rank: int) -> int:
    """Weights, optimizer and RNG back to the last checkpoint; the data position stays where it is, so the
    batches since then (the offending ones among them) are skipped rather than replayed (PaLM's remedy)."""
    state = checkpoints.load(engine)
    if state is None:
        raise GptlineError(
            f"the loss guard saw {guard.consecutive} bad batches in a row before the first checkpoint; "
            f"lower {stage}.optim.lr or {stage}.checkpoint_every"
        )
    set_rng_state(state["rng"][rank])
    guard.rollbacks += 1
    guard.consecutive = 0
    if rank == 0:
        print(f"[{stage}] rolled back to step {state['step']} (rollback {guard.rollbacks})", flush=True)
    return state["step"]


def mirror_log(mirror: NodeMirror, rank: int) -> None:
    """After a checkpoint: rank 0 uploads the log as far as it, so a resume on another node continues that log."""
    if rank == 0 and mirror.enabled:
        mirror.push([LOG])


class StopPoll:
    """Whether this rank has seen a request to stop: the marker in its node's work directory (every call), or, for
    rank 0 with an enabled mirror, in the store's copy, where the stage's task publishes it for nodes that do not
    share its work directory (at most every `every_s`: one request to the store, not one per step)."""

    def __init__(self, out_dir: Path, mirror: NodeMirror, rank: int, every_s: float = 5.0):
        self.out_dir, self.every_s, self.last = out_dir, every_s, 0.0
        self.mirror = mirror if rank == 0 and mirror.enabled else None

    def __call__(self) -> bool:
        if stop_requested(self.out_dir):
            return True
        if self.mirror is None or time.monotonic() - self.last < self.every_s:
            return False
        self.last = time.monotonic()
        return self.mirror.exists(STOP_REQUEST)


def stop_requested_on_any_rank(poll: StopPoll) -> bool:
    """Whether to stop after this iteration, the same answer on every rank (each may see the request at a different
    moment). `fit` folds this vote into its per-step token all-reduce instead."""
    return sum_over_ranks([float(poll())])[0] > 0


def stopped(out_dir: Path, step: int, rank: int, log) -> dict[str, Any]:
    """End a loop asked to stop after `step` (its checkpoint written): rank 0 leaves the mark `launch` reads."""
    record = {"stopped_at_step": step}
    if rank == 0:
        log.close()
        (out_dir / FINAL).write_text(json.dumps(record) + "\n")
    return record


def mean_over_ranks(value: torch.Tensor) -> float:
    if torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over every rank, in one all-reduce."""
    total = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.tolist()


def gather_rng(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, so a resumed rank continues its own stream (all ranks hold the full list)."""
    states: list[Any] = [None] * world
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    return states


def consolidated_state(
    engine, ds: DeepSpeedConfig, checkpoints: Checkpoints, rank: int
) -> dict[str, torch.Tensor] | None:
    """fp32 weights gathered from every ZeRO partition (under ZeRO-3 from the newest of `checkpoints`, every
    rank's files of it fetched first), on rank 0 (None elsewhere); call on every rank."""
    barrier()
    if ds.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if rank != 0:
            return None
        tag = checkpoints.download_all()
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints.directory), tag=tag)
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()} if rank == 0 else None


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_stage_file(rel: str) -> bool:
    """Whether a path in a training stage's work directory is one of the stage's own files (what is mirrored as a
    whole): not the checkpoints (each rank moves its own), not Ray Train's directory, not a stop request."""
    return rel.split("/")[0] not in (CHECKPOINTS, RAY_TRAIN, STOP_REQUEST)


def local_stage_files(out_dir: Path) -> list[str]:
    files = (p.relative_to(out_dir).as_posix() for p in sorted(out_dir.rglob("*")) if p.is_file())
    return [rel for rel in files if is_stage_file(rel)]


def stored_stage_files(mirror: NodeMirror) -> list[str]:
    return [rel for rel in mirror.list() if is_stage_file(rel)]


def _on_worker(worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any]) -> None:
    """A worker on any node: with a mirror, the inputs (once per node) and the stage's files (what it wrote before
    the workers started, the log of an earlier attempt) are fetched before anyone starts; after the fit, rank 0
    uploads what it wrote (weights, export, log, final.json) for the stage's own task to commit."""
    import ray.train

    mirror: NodeMirror = loop_config["mirror"]
    if mirror.enabled:
        # Every rank, not one per node: Ray Train numbers local ranks by IP address, which nodes may share.
        Path(loop_config["out_dir"]).mkdir(parents=True, exist_ok=True)
        mirror.pull_inputs()
        mirror.pull(stored_stage_files(mirror))
        barrier()  # nobody writes to the work directory while another rank may still replace a file there
    worker(loop_config)
    if mirror.enabled and ray.train.get_context().get_world_rank() == 0:
        mirror.push(local_stage_files(Path(loop_config["out_dir"])))


def launch(
    stage: str, worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], ctx: StageContext, out_dir: Path
) -> dict[str, Any]:
    """Run `worker(loop_config)` on `num_workers` Ray Train workers; returns the final metrics rank 0 wrote."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ctx.resources.gpus_per_worker > 0
    resources = {"CPU": ctx.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = ctx.resources.gpus_per_worker
    loop_config = {**loop_config, "out_dir": str(out_dir), "progress": ctx.progress, "mirror": ctx.mirror,
                   "threads": max(1, int(ctx.resources.cpus_per_worker))}  # fmt: skip
    trainer = TorchTrainer(
        functools.partial(_on_worker, worker),
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=ctx.resources.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=stage,
            storage_path=str((out_dir / RAY_TRAIN).resolve()),
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    if ctx.mirror.enabled:  # what this task wrote for its workers (sft's and rm's examples)
        ctx.mirror.push(local_stage_files(out_dir))
    try:
        result = trainer.fit()
    finally:
        if ctx.mirror.enabled:
            # The store's copy is the one that counts: rank 0's outputs come here, this node's (stale) checkpoints
            # go, so nothing uploads them over the store's newer ones.
            ctx.mirror.pull(stored_stage_files(ctx.mirror))
            shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    if result.error is not None:
        raise result.error
    shutil.rmtree(out_dir / RAY_TRAIN, ignore_errors=True)
    final = json.loads((out_dir / FINAL).read_text())
    if "stopped_at_step" in final:  # the checkpoints stay in the partial directory for the resume
        raise StageStopped(
            f"{stage} was asked to stop (SIGTERM) and stopped after step {final['stopped_at_step']} with a checkpoint; "
            "resuming the run continues from it"
        )
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)  # the consolidated weights are the artifact
    for line in (out_dir / LOG).read_text().splitlines():
        record = json.loads(line)
        ctx.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, list)}, record["step"])
    return final


def log_sections(directory: Path, charts: list[tuple[str, tuple[str, ...]]]) -> list[dict[str, Any]]:
    """What the run report shows of a training artifact: line charts of `train_log.jsonl` keys by step (one chart
    per (title, keys)), and the last logged samples as a table."""
    records = [json.loads(line) for line in (directory / LOG).read_text().splitlines() if line.strip()]
    sections: list[dict[str, Any]] = [
        {
            "kind": "lines",
            "title": title,
            "x_label": "step",
            "series": {
                key: [[r["step"], r[key]] for r in records if isinstance(r.get(key), int | float)]
                for key in keys
                if any(key in r for r in records)
            },
        }
        for title, keys in charts
    ]
    last = next((r for r in reversed(records) if r.get("samples")), None)
    if last is not None:
        sections.append({"kind": "table", "title": f"samples at step {last['step']}", "columns": ["sample"],
                         "rows": [[s] for s in last["samples"]]})  # fmt: skip
    return [s for s in sections if s["kind"] != "lines" or s["series"]]
