"""Metric tracking: one wandb run per stage execution, plus a JSONL copy that never depends on wandb.

wandb runs are grouped by pipeline run id, with job_type = stage name and the stage's config attached. The mode is
`offline` by default (everything stays under the run directory; `wandb sync` uploads later), `online` only when the
user asks, or `disabled`. Every metric is appended to `metrics/<stage>.jsonl` in the run record whatever the mode.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact that it happened
    return value


class Tracker:
    def __init__(
        self,
        mode: str,
        project: str,
        entity: str | None,
        run_id: str,
        stage: str,
        version: str,
        config: Mapping[str, Any],
        metrics_path: Path,
        wandb_dir: Path,
    ):
        self.metrics_path = metrics_path
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb_run = None
        if mode != "disabled":
            import wandb

            wandb_dir.mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(
                project=project,
                entity=entity,
                group=run_id,
                job_type=stage,
                name=f"{stage}-{version}",
                config=dict(config),
                mode=mode,
                dir=str(wandb_dir),
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True),
            )

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        record = {"time": time.time(), "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(dict(metrics), step=step)

    def finish(self, summary: Mapping[str, Any] | None = None, failed: bool = False) -> None:
        if self._wandb_run is None:
            return
        if summary:
            self._wandb_run.summary.update({k: _plain(v) for k, v in summary.items()})
        self._wandb_run.finish(exit_code=1 if failed else 0)
        self._wandb_run = None
