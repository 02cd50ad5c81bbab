"""A stage's worker group: one function run on `num_workers` Ray Train workers with a torch process group among them.

`run_worker_group(fn, arg, out_dir, ctx)` is what `StageContext.run_workers` does. It starts a Ray Train
`TorchTrainer` (gloo on CPU, nccl when the stage asks for GPUs) of `ctx.resources` workers, each calling `fn(arg)`,
and restarts the whole group up to twice when a worker dies (the function resumes from its own checkpoints). Ray
Train's own files go to the work directory's transient part, which never becomes part of the artifact.

Nodes that do not share the store (an object store: an enabled `ctx.mirror`) get the stage's files around the call:
every rank downloads the inputs (once per node) and the stage's files already in the store (what the stage's task
wrote for its workers, the log of an earlier attempt) before anyone starts; after the call rank 0 uploads what it
wrote; the stage's task then downloads the store's copy. Transient files (checkpoints) are moved by the ranks that
write them, never as a whole.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.artifacts import TRANSIENT, NodeMirror, artifact_files
from pipeline.dag import STOP_REQUEST, StageContext

MAX_GROUP_RESTARTS = 2


def stage_files(out_dir: Path) -> list[str]:
    """The work directory's own files, moved between nodes as a whole: not the transient ones, not a stop request."""
    return [rel for rel in artifact_files(out_dir) if rel != STOP_REQUEST]


def stored_stage_files(mirror: NodeMirror) -> list[str]:
    return [rel for rel in mirror.list() if rel.split("/")[0] != TRANSIENT and rel != STOP_REQUEST]


def _on_worker(fn: Callable[[Any], None], arg: Any, out_dir: str, mirror: NodeMirror) -> None:
    import ray.train
    import torch.distributed

    if mirror.enabled:
        # Every rank, not one per node: Ray Train numbers local ranks by IP address, which nodes may share.
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        mirror.pull_inputs()
        mirror.pull(stored_stage_files(mirror))
        torch.distributed.barrier()  # nobody writes to the work directory while another rank may still replace a file
    fn(arg)
    if mirror.enabled and ray.train.get_context().get_world_rank() == 0:
        mirror.push(stage_files(Path(out_dir)))


def run_worker_group(fn: Callable[[Any], None], arg: Any, out_dir: Path, ctx: StageContext) -> None:
    """`fn(arg)` on every worker of the group; raises the workers' error when the group fails for good."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ctx.resources.gpus_per_worker > 0
    resources = {"CPU": ctx.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = ctx.resources.gpus_per_worker
    trainer = TorchTrainer(
        functools.partial(_on_worker, fn, arg, str(out_dir), ctx.mirror),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=ctx.resources.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=ctx.stage,
            storage_path=str((ctx.transient(out_dir) / "ray_train").resolve()),
            failure_config=FailureConfig(max_failures=MAX_GROUP_RESTARTS),
        ),
    )
    if ctx.mirror.enabled:  # what this task wrote for its workers (sft's and rm's examples)
        ctx.mirror.push(stage_files(out_dir))
    try:
        result = trainer.fit()
    finally:
        if ctx.mirror.enabled:
            # The store's copy is the one that counts: rank 0's outputs come here, and this node's transient files
            # (stale checkpoints) go, so nothing uploads them over the store's newer ones.
            ctx.mirror.pull(stored_stage_files(ctx.mirror))
            shutil.rmtree(ctx.transient(out_dir), ignore_errors=True)
    if result.error is not None:
        raise result.error
