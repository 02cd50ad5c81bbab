"""`fit`: the one loop every training stage runs, around a task's `step`.

A task is what a stage trains: `step()` does one optimizer step of every engine (a supervised stage's micro-batches;
a PPO rollout and its updates) and returns its figures; `evaluate()` and `samples()` measure; `state_dict()` is
its position (loaders, controllers). `fit` owns everything else, once:
- restore from the newest checkpoint (engines, the task's position, every rank's RNG state), cutting the log back
  to that step so each step is logged once; a run restored at its last step goes straight to the end, so a crash
  after the final checkpoint (consolidation, export, commit) resumes without training again;
- the learning rate of every engine at every step;
- one line per step in `train_log.jsonl` (rank 0), tokens/s and MFU, evaluation and samples on their cadence;
- checkpoints on their cadence, at the last step and when asked to stop; a stop request seen by any rank stops
  every rank after the same step (the vote rides on the step's one all-reduce);
- a rollback when the task raises `RollBack` (its loss guard saw too many bad batches in a row): weights, optimizer
  and RNG back to the last checkpoint, the data position left where it is, so the offending batches are skipped;
- `final.json`, the stage's metrics (or the step it stopped at), with the step the last attempt restored from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from gptline.training.checkpoints import Checkpoints, gather_rng, set_rng_state
from gptline.training.collectives import sum_over_ranks
from gptline.training.config import OptimConfig
from gptline.training.engine import lr_at, set_lr
from gptline.training.log import LOG, STOPPED, TrainLog, summary, write_final
from pipeline.errors import GptlineError
from pipeline.faults import fault_point


class RollBack(Exception):
    """Raised by a task's step: restore the last checkpoint and go on from there with the next batches."""


@dataclass(frozen=True)
class Schedule:
    """How long a stage trains and how often it measures and saves (`every` = 0: at the last step only)."""

    total_steps: int
    eval_every: int = 0
    sample_every: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2

    def due(self, every: int, step: int) -> bool:
        return step == self.total_steps or (every > 0 and step % every == 0)

    @classmethod
    def of(cls, cfg, total_steps: int) -> Schedule:
        """A loss-based stage's schedule from its config (a `TrainConfig`)."""
        return cls(total_steps, cfg.eval_every, cfg.sample_every, cfg.checkpoint_every, cfg.keep_checkpoints)


class Task(Protocol):
    flops_per_token: float  # training FLOPs per token, for MFU; 0: not reported
    headline: tuple[str, ...]  # the figures the progress bar shows

    def step(self, step: int) -> dict[str, float]:
        """Optimizer step `step + 1` of every engine; its figures for the log, with `tokens` (trained on by this
        rank). May raise `RollBack`."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, called on every rank together (collectives allowed)."""

    def samples(self) -> list[str]:
        """Generations to log, called on rank 0 only."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Figures for final.json beyond the last step's (e.g. the first iteration's reward)."""


@dataclass
class Loop:
    """What `fit` drives: the engines by name with their optimizer settings, where checkpoints and the log go."""

    stage: str
    engines: dict[str, Any]
    optims: dict[str, OptimConfig]
    schedule: Schedule
    checkpoints: Checkpoints
    log: TrainLog
    seed: int
    peak_flops: float  # per worker; 0: no MFU
    zero_stage: int  # the ZeRO stage in effect (recorded in final.json)


def fit(loop: Loop, task: Task, rank: int, world: int, progress, stop_requested) -> dict[str, Any]:
    """Train to the schedule's last step, resuming from the newest checkpoint; write final.json (rank 0) and return
    it. `stop_requested()` polls for a request to stop; `progress` draws the bar."""
    schedule, log = loop.schedule, loop.log
    first_engine = loop.engines[next(iter(loop.engines))]
    step, tokens_seen = _restore(loop, task, rank)
    restored_step = step
    bar = progress(schedule.total_steps, f"[{loop.stage}] training", unit="step")
    bar.update(step)
    shown: dict[str, float] = {}
    attempt_started = time.perf_counter()
    while step < schedule.total_steps:
        started = time.perf_counter()
        for name, engine in loop.engines.items():
            set_lr(engine.optimizer, lr_at(step, schedule.total_steps, loop.optims[name]))
        try:
            figures = task.step(step)
        except RollBack:
            step, tokens_seen = _roll_back(loop, rank)
            continue
        step += 1
        tokens, stop_votes = sum_over_ranks([float(figures.pop("tokens")), float(stop_requested())])
        seconds = time.perf_counter() - started
        tokens_seen += int(tokens)
        record: dict[str, Any] = {"step": step, **figures, "lr": first_engine.optimizer.param_groups[0]["lr"]}
        record["tokens_per_s"] = tokens / seconds
        record["time_s"] = time.perf_counter() - attempt_started  # wall time of this attempt so far
        if task.flops_per_token and loop.peak_flops:
            record["mfu"] = tokens * task.flops_per_token / seconds / (loop.peak_flops * world)
        if schedule.due(schedule.eval_every, step):
            record.update(task.evaluate())
        if rank == 0 and schedule.due(schedule.sample_every, step):
            record["samples"] = task.samples()
        log.append(record)
        fault_point(f"{loop.stage}.after_step_{step}")  # crash tests kill a worker between checkpoints here
        shown.update((k, record[k]) for k in task.headline if k in record)
        bar.update(1, **shown)
        stop = stop_votes > 0
        if schedule.due(schedule.checkpoint_every, step) or stop:
            client = {"step": step, "tokens_seen": tokens_seen, "task": task.state_dict(), "rng": gather_rng(world)}
            loop.checkpoints.save(loop.engines, step, client, with_files=[LOG])  # a resume elsewhere continues it
            fault_point(f"{loop.stage}.after_checkpoint_{step}")  # crash tests kill a worker here
        if stop and step < schedule.total_steps:
            bar.close()
            return _finish(loop, rank, {STOPPED: step})
    bar.close()
    if rank != 0:
        return {}
    records = log.records()
    # ZeRO-3 leaves each rank a slice of every parameter; ds_numel is the full size.
    params = sum(getattr(p, "ds_numel", p.numel()) for p in first_engine.module.parameters())
    extra = {"steps": step, "params": params, "tokens_seen": tokens_seen, "zero_stage": loop.zero_stage,
             "restored_step": restored_step}  # fmt: skip
    return _finish(loop, rank, summary(records, {**extra, **task.summary(records)}))


def _finish(loop: Loop, rank: int, final: dict[str, Any]) -> dict[str, Any]:
    """final.json written by rank 0; every rank gets `final` back."""
    if rank == 0:
        write_final(Path(loop.log.path).parent, final)
    return final


def _restore(loop: Loop, task: Task, rank: int) -> tuple[int, int]:
    """(step, tokens seen) after restoring the newest checkpoint, or (0, 0) for a fresh start."""
    state = loop.checkpoints.load(loop.engines)
    if state is None:
        loop.log.cut_to(0)  # an earlier attempt that died before its first checkpoint may have logged steps
        torch.manual_seed(loop.seed + 1 + rank)
        return 0, 0
    task.load_state_dict(state["task"])
    set_rng_state(state["rng"][rank])
    loop.log.cut_to(state["step"])
    return state["step"], state["tokens_seen"]


def _roll_back(loop: Loop, rank: int) -> tuple[int, int]:
    """Weights, optimizer and RNG back to the last checkpoint; the task's data position stays where it is, so the
    batches since then (the offending ones among them) are skipped rather than replayed (PaLM's remedy)."""
    state = loop.checkpoints.load(loop.engines)
    if state is None:
        raise GptlineError(
            f"the loss guard saw too many bad batches in a row before the first checkpoint; lower "
            f"{loop.stage}.optim.lr or {loop.stage}.checkpoint_every"
        )
    set_rng_state(state["rng"][rank])
    loop.log.cut_to(state["step"])
    if rank == 0:
        print(f"[{loop.stage}] rolled back to step {state['step']}", flush=True)
    return state["step"], state["tokens_seen"]
