"""The one worker every training stage runs, and the spec the driver hands it.

On the driver a stage builds a `WorkerSpec`: typed, frozen, the only thing that crosses to the workers. Its
`recipe` is the stage's own frozen dataclass and says what is the stage's own: which models it trains
(`models`), the task that trains them (`task`: data, loss or step, evaluation, samples) and how the trained
weights become the artifact (`export`). `run_worker(spec)` does the rest on every rank, the same for every stage:
threads, seeding, one DeepSpeed engine per trained model (at the ZeRO stage in effect for the group's size),
`fit` (checkpoint restore, the loop, stop requests, the log), fp32 weights consolidated from every ZeRO partition,
and the export on rank 0.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from gptline.training.checkpoints import Checkpoints
from gptline.training.collectives import barrier, world
from gptline.training.config import DeepSpeedConfig, OptimConfig
from gptline.training.engine import effective_zero_stage, fp32_weights, init_deepspeed
from gptline.training.fit import Loop, Schedule, Task, fit
from gptline.training.log import STOPPED, TrainLog
from pipeline.faults import fault_point


@dataclass
class TrainedModel:
    """A model a stage trains, with its optimizer settings and per-worker batch shape."""

    module: torch.nn.Module
    optim: OptimConfig
    micro_batch: int
    grad_accum: int = 1
    exported: bool = True  # consolidated at the end and handed to the recipe's export


class Recipe(Protocol):
    """What is a training stage's own (a frozen dataclass of the stage's; it pickles to the workers)."""

    def models(self) -> dict[str, TrainedModel]:
        """The trained models, built the same on every rank (the worker seeds torch first); the first one's
        engine is the one the log's learning rate and parameter count describe."""

    def task(self, engines: dict[str, Any], rank: int, world: int) -> Task: ...

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        """Write the artifact from the exported models' consolidated fp32 weights (rank 0 only)."""


@dataclass(frozen=True)
class WorkerSpec:
    stage: str
    recipe: Any  # a Recipe
    out_dir: str
    checkpoint_dir: str  # in the work directory's transient part: kept until the commit, never in the artifact
    schedule: Schedule
    deepspeed: DeepSpeedConfig
    seed: int
    threads: int  # per worker; 0: the node's cores shared by the workers on it
    peak_flops: float  # per worker, for MFU; 0: not reported
    progress: Any  # pipeline.progress.Progress
    mirror: Any  # gptline.training.checkpoints.Mirror
    stop: Any  # pipeline.dag.StopSignal


def worker_threads(requested: int, local_workers: int) -> int:
    """`requested`, or the cores this process may use shared evenly among the `local_workers` of its node."""
    return requested or max(1, len(os.sched_getaffinity(0)) // local_workers)


def run_worker(spec: WorkerSpec) -> None:
    rank, world_size = world()
    # Ray Train tells each worker how many of the group share its node.
    torch.set_num_threads(worker_threads(spec.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    zero_stage = effective_zero_stage(spec.deepspeed, world_size)
    deepspeed = dataclasses.replace(spec.deepspeed, zero_stage=zero_stage)
    if rank == 0 and zero_stage != spec.deepspeed.zero_stage:
        print(f"[{spec.stage}] one worker: ZeRO stage 0 in effect ({spec.stage}.deepspeed.zero_stage="
              f"{spec.deepspeed.zero_stage} partitions nothing in a group of one)", flush=True)  # fmt: skip
    torch.manual_seed(spec.seed)  # every rank builds the same initial weights
    models = spec.recipe.models()
    engines = {}
    for name, model in models.items():
        engines[name], _ = init_deepspeed(model.module, model.optim, deepspeed, model.micro_batch, model.grad_accum)
        # Alone at stage 0, DeepSpeed would still flatten every gradient into a buffer, all-reduce it with itself and
        # copy it back after each backward pass: an identity that costs a pass over the gradients. (ZeRO 1-3 finalize
        # their partitions in that call, so they keep it.)
        engines[name].enable_backward_allreduce = world_size > 1 or zero_stage > 0
    task = spec.recipe.task(engines, rank, world_size)
    checkpoints = Checkpoints(Path(spec.checkpoint_dir), spec.schedule.keep_checkpoints, spec.mirror, rank)
    optims = {name: model.optim for name, model in models.items()}
    loop = Loop(spec.stage, engines, optims, spec.schedule, checkpoints, TrainLog(Path(spec.out_dir), rank == 0),
                spec.seed, spec.peak_flops, zero_stage)  # fmt: skip
    progress = spec.progress if rank == 0 else dataclasses.replace(spec.progress, mode="quiet")
    final = fit(loop, task, rank, world_size, progress, spec.stop.poller(rank))
    if STOPPED in final:  # the checkpoint stays for the resume; nothing to export yet
        return
    fault_point(f"{spec.stage}.before_consolidation")
    weights = {name: consolidated_state(engines[name], zero_stage, checkpoints, name, rank)
               for name, model in models.items() if model.exported}  # fmt: skip
    if rank == 0:
        fault_point(f"{spec.stage}.before_export")
        spec.recipe.export(weights, Path(spec.out_dir))
    barrier()


def consolidated_state(engine, zero_stage: int, checkpoints: Checkpoints, name: str, rank: int) -> dict | None:
    """fp32 weights gathered from every ZeRO partition (under ZeRO-3 from the newest checkpoint, every rank's
    files of it fetched first), on rank 0 (None elsewhere); call on every rank."""
    barrier()
    if zero_stage < 3:
        return fp32_weights(engine, rank)
    if rank != 0:
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = checkpoints.download_all(name)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints.directory / name), tag=tag)
