"""Progress of long steps: a bar in a terminal, a line every few seconds in a log, nothing in quiet mode.

The driver decides the mode once (`run.quiet` gives `quiet`; `GPTLINE_PROGRESS=bar|lines|quiet` forces one;
standard output a terminal gives `bar`; anything else, such as CI logs or `| tee`, gives `lines`) and hands it to every stage in `StageContext.progress`, a small picklable
object that training stages pass on to their workers. A stage calls `ctx.progress(total, desc)` and `update(n,
**status)` on what it gets back; it never learns which mode it is in.

In `bar` mode, inside a Ray worker the bar is Ray's `tqdm_ray`: the worker prints its state as a tagged line and
the driver draws one real tqdm bar per worker bar, so concurrent stages and workers never tear each other's
output; in a plain process it is tqdm itself. The status (loss, tokens/s, reward, KL ...) rides in the bar's
description.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

MODES = ("bar", "lines", "quiet")
# The tag tqdm_ray puts on a worker's bar-state lines; logs written to files leave them out.
BAR_STATE_TAG = "__ray_tqdm_magic_token__"


def default_mode(quiet: bool) -> str:
    """quiet when asked; else GPTLINE_PROGRESS if set (bar, lines or quiet); else bars on a terminal, lines in logs."""
    if quiet:
        return "quiet"
    forced = os.environ.get("GPTLINE_PROGRESS", "")
    if forced:
        if forced not in MODES:
            raise ConfigError(f"GPTLINE_PROGRESS={forced!r}: must be one of {', '.join(MODES)}")
        return forced
    return "bar" if sys.stdout.isatty() else "lines"


def _status(status: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in status.items())


@dataclass(frozen=True)
class Progress:
    mode: str = "lines"
    every_s: float = 10.0  # `lines` mode: at most one line per this many seconds (and one at the end)

    def __call__(self, total: int, desc: str, unit: str = "it", every_s: float | None = None) -> Bar:
        """A bar over `total` units; `every_s` overrides how often `lines` mode prints (0: every update)."""
        return Bar(self, total, desc, unit, self.every_s if every_s is None else every_s)


class Bar:
    def __init__(self, progress: Progress, total: int, desc: str, unit: str, every_s: float):
        self.progress, self.total, self.desc, self.n, self.every_s = progress, total, desc, 0, every_s
        self._last_line = time.monotonic()
        self._bar = None
        if progress.mode == "bar":
            self._bar = _tqdm_class()(total=total, desc=desc, unit=unit)

    def update(self, n: int = 1, **status: Any) -> None:
        self.n += n
        text = _status(status)
        if self._bar is not None:
            if status:
                self._bar.set_description(f"{self.desc} {text}")
            self._bar.update(n)
        elif self.progress.mode == "lines":
            now = time.monotonic()
            if now - self._last_line >= self.every_s or self.n >= self.total:
                self._last_line = now
                print(f"{self.desc} {self.n}/{self.total} {text}".rstrip(), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tqdm_class():
    try:
        import ray

        if ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE:  # as tqdm_ray checks
            from ray.experimental.tqdm_ray import tqdm

            return tqdm
    except ImportError:
        pass
    from tqdm import tqdm

    return tqdm
