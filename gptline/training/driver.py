"""The driver's half of a training stage: start the worker group on a recipe and collect what it left.

`train(...)` builds the `WorkerSpec` from the stage's recipe and the stage context (its resources, progress, where
its workers reach the work directory, how they learn of a stop request), runs `run_worker` on the stage's worker
group (`ctx.run_workers`), and returns final.json's metrics after replaying the log into the stage's tracker (one
record per step). A stage asked to stop raises `StageStopped`, its checkpoint kept for the resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptline.training.config import DeepSpeedConfig
from gptline.training.fit import Schedule
from gptline.training.log import STOPPED, TrainLog, read_final
from gptline.training.worker import WorkerSpec, run_worker
from pipeline.errors import StageStopped


def train(stage: str, recipe: Any, schedule: Schedule, deepspeed: DeepSpeedConfig, seed: int, ctx, out_dir: Path,
          peak_flops: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Train `recipe` on the stage's workers; `ctx` is the stage's StageContext, `peak_flops` per worker (0: no
    MFU)."""
    spec = WorkerSpec(
        stage=stage,
        recipe=recipe,
        out_dir=str(out_dir),
        checkpoint_dir=str(ctx.transient(out_dir) / "checkpoints"),
        schedule=schedule,
        deepspeed=deepspeed,
        seed=seed,
        threads=ctx.resources.threads_per_worker,
        peak_flops=peak_flops,
        progress=ctx.progress,
        mirror=ctx.mirror,
        stop=ctx.stop_signal(out_dir),
    )
    ctx.run_workers(run_worker, spec, out_dir)
    final = read_final(out_dir)
    if STOPPED in final:
        raise StageStopped(
            f"{stage} was asked to stop (SIGTERM) and stopped after step {final[STOPPED]} with a checkpoint; "
            "resuming the run continues from it"
        )
    for record in TrainLog(out_dir, writer=False).records():
        ctx.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, list)}, record["step"])
    return final
