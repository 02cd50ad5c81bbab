"""A training stage's record of its steps: `train_log.jsonl` (one JSON line per step, every step exactly once, also
after a resume or a rollback), `final.json` (the stage's metrics), and what the run report draws from them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG = "train_log.jsonl"
FINAL = "final.json"
STOPPED = "stopped_at_step"


class TrainLog:
    """`train_log.jsonl` in a work directory; rank 0 writes it, other ranks hold a TrainLog that writes nothing."""

    def __init__(self, out_dir: Path, writer: bool):
        self.path, self.writer = Path(out_dir) / LOG, writer

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def cut_to(self, step: int) -> None:
        """Keep the records of steps up to `step` (the step a checkpoint restored), so the steps run again after it
        are not logged twice."""
        if not self.writer:
            return
        kept = "".join(json.dumps(r) + "\n" for r in self.records() if r["step"] <= step)
        tmp = self.path.with_name(LOG + ".tmp")
        tmp.write_text(kept)
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        if self.writer:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def write_final(out_dir: Path, final: dict[str, Any]) -> None:
    (Path(out_dir) / FINAL).write_text(json.dumps(final) + "\n")


def read_final(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / FINAL).read_text())


def summary(records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """The stage's metrics from its log: the last step's held-out figures first (the status table shows the first
    few), then its training figures (`loss` as `train_loss`), then `extra` (steps, parameters, ...)."""
    last = {k: v for k, v in records[-1].items() if k not in ("step", "lr", "samples")}
    held_out = {k: v for k, v in last.items() if k.startswith("val_")}
    trained = {("train_loss" if k == "loss" else k): v for k, v in last.items() if k not in held_out}
    return {**held_out, **trained, **extra}


def log_sections(directory: Path, charts: list[tuple[str, tuple[str, ...]]]) -> list[dict[str, Any]]:
    """What the run report shows of a training artifact: line charts of `train_log.jsonl` keys by step (one chart
    per (title, keys)), and the last logged samples as a table."""
    records = TrainLog(directory, writer=False).records()
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
