"""Small real stages for the pipeline's own tests: they write and read Parquet with pyarrow.

    numbers ─┬─► squares ─┬─► total
             └─► evens ───┘

`numbers` writes its chunks one file at a time (each atomically), so a crashed attempt leaves finished chunks in
its partial directory and a resumed one writes only the rest; asked to stop (SIGTERM), it stops after a chunk. Every chunk written and every stage execution is
appended to the file named by GPTLINE_TEST_LEDGER, so tests can count what actually ran.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dag import StageContext, StageSpec, stop_requested
from pipeline.errors import StageStopped
from pipeline.faults import fault_point


def ledger(ctx: StageContext, out_dir: Path, event: str) -> None:
    path = os.environ.get("GPTLINE_TEST_LEDGER")
    if path:
        with open(path, "a") as f:
            f.write(f"{ctx.stage} {event} {out_dir.parent.parent}\n")


def write_atomically(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_dir(path: Path) -> pa.Table:
    return pq.read_table(sorted(str(p) for p in path.glob("*.parquet")))


@dataclass
class NumbersConfig:
    chunks: int = 4
    rows_per_chunk: int = 1000
    seed: int = 0
    delay_s: float = 0.0  # per chunk, to widen race windows in concurrency tests

    def validate(self) -> list[tuple[str, str]]:
        if self.chunks < 1:
            return [("chunks", f"must be >= 1, got {self.chunks}")]
        return []


def numbers(cfg: NumbersConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict:
    ledger(ctx, out_dir, "start")
    for i in range(cfg.chunks):
        path = out_dir / f"chunk-{i:04d}.parquet"
        if path.exists():
            continue
        rng = np.random.default_rng([cfg.seed, i])
        write_atomically(pa.table({"x": rng.integers(0, 1000, cfg.rows_per_chunk)}), path)
        ledger(ctx, out_dir, f"chunk{i}")
        ctx.log({"chunk": i}, i)
        time.sleep(cfg.delay_s)
        fault_point(f"numbers.after_chunk_{i}")
        if stop_requested(out_dir) and i + 1 < cfg.chunks:
            raise StageStopped(f"numbers was asked to stop and stopped after chunk {i}")
    return {"rows": cfg.chunks * cfg.rows_per_chunk}


@dataclass
class SquaresConfig:
    power: int = 2
    delay_s: float = 0.0  # so that squares and evens overlap in the cluster tests


def squares(cfg: SquaresConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict:
    ledger(ctx, out_dir, "start")
    time.sleep(cfg.delay_s)
    x = read_dir(inputs["numbers"]).column("x")
    write_atomically(pa.table({"y": pc.power(x, cfg.power)}), out_dir / "squares.parquet")
    return {"rows": len(x)}


def numbers_report(directory: Path) -> list[dict]:
    """What the run report draws for `numbers`: a histogram, the running mean, and a table with markup in it."""
    x = read_dir(directory).column("x").to_numpy()
    counts, edges = np.histogram(x, bins=5, range=(0, 1000))
    running = np.cumsum(x) / np.arange(1, len(x) + 1)
    return [
        {"kind": "bars", "title": "histogram", "categories": [f"<{int(e)}" for e in edges[1:]],
         "series": {"rows": counts.tolist()}},
        {"kind": "lines", "title": "running mean", "series": {"mean": [[i, float(running[i])] for i in
                                                                       range(0, len(x), 50)],
                                                              "first": [[0, float(x[0])], [1, float("nan")]]}},
        {"kind": "table", "title": "rows", "columns": ["name", "value"], "rows": [["<script>alert(1)</script>", 1]]},
    ]  # fmt: skip


@dataclass
class EvensConfig:
    modulus: int = 2
    delay_s: float = 0.0


def evens(cfg: EvensConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict:
    ledger(ctx, out_dir, "start")
    time.sleep(cfg.delay_s)
    table = read_dir(inputs["numbers"])
    kept = table.filter(pc.equal(pc.bit_wise_and(table.column("x"), cfg.modulus - 1), 0))
    write_atomically(kept, out_dir / "evens.parquet")
    return {"rows": kept.num_rows}


@dataclass
class TotalConfig:
    scale: float = 1.0


def total(cfg: TotalConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict:
    ledger(ctx, out_dir, "start")
    value = cfg.scale * (
        pc.sum(read_dir(inputs["squares"]).column("y")).as_py() + pc.sum(read_dir(inputs["evens"]).column("x")).as_py()
    )
    write_atomically(pa.table({"total": [value]}), out_dir / "total.parquet")
    return {"total": value}


REGISTRY = [
    StageSpec("numbers", numbers, NumbersConfig, report=numbers_report, stops_on_request=True),
    StageSpec("squares", squares, SquaresConfig, inputs=("numbers",)),
    StageSpec("evens", evens, EvensConfig, inputs=("numbers",)),
    StageSpec("total", total, TotalConfig, inputs=("squares", "evens")),
]

CYCLIC = [
    StageSpec("first", numbers, NumbersConfig, inputs=("second",)),
    StageSpec("second", squares, SquaresConfig, inputs=("first",)),
]
