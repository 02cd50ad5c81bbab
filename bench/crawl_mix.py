"""Benchmark crawl-mix: documents/s and MB/s per phase, and the speed-up of 2 Ray workers over 1, side by side.

    python -m bench.crawl_mix [--store store] [--repeats 3] [--warmup 1]

Input: the default corpus (the `fetch` stage's artifact in the store; built first with `gptline run --until fetch`
when absent). Both configurations run the real stage function on the same input, alternating, each with its
phases fanned out as Ray tasks (`RayMap`, as under the runner); medians of the repeats are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from pipeline.artifacts import Store
from pipeline.config import DEFAULT_CONFIG_DIR, compose_config, typed
from pipeline.dag import StageContext, StageResources
from pipeline.progress import Progress
from pipeline.runner import RayMap
from stages import REGISTRY
from stages.crawl_mix import CrawlMixConfig, run


def fetch_artifact(store: Path) -> Path:
    found = Store(str(store)).list("fetch") if store.exists() else []
    if not found:
        subprocess.run([sys.executable, "-m", "gptline", "run", f"store.root={store}", "--until", "fetch"], check=True)
        found = Store(str(store)).list("fetch")
    return Path(found[-1].path)


def one_run(cfg: CrawlMixConfig, fetch: Path, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-crawl-mix-{workers}w-"))
    resources = StageResources(num_workers=workers, cpus_per_worker=1.0)
    ctx = StageContext(
        "crawl_mix", resources=resources, quiet=True, map=RayMap("crawl_mix", resources, Progress("quiet"))
    )
    start = time.perf_counter()
    metrics = run(cfg, {"fetch": fetch}, out, ctx)
    wall = time.perf_counter() - start
    stats = json.loads((out / "stats.json").read_text())
    shutil.rmtree(out)
    return {
        "wall": wall,
        **metrics,
        "docs": stats["totals"]["records"],
        "kept": stats["totals"]["after_filter"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (imports, Ray's workers)")
    args = parser.parse_args()

    fetch = fetch_artifact(Path(args.store).resolve())
    config = compose_config(REGISTRY, [], DEFAULT_CONFIG_DIR)
    cfg = typed(CrawlMixConfig, config["data"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.warmup):
        one_run(cfg, fetch, 2)
    for _ in range(args.repeats):
        for workers in (1, 2):
            results[workers].append(one_run(cfg, fetch, workers))
    ray.shutdown()

    def median(workers: int, key: str) -> float:
        return statistics.median(r[key] for r in results[workers])

    first = results[1][0]
    mb, docs, kept = first["mb_in"], first["docs"], first["kept"]
    print(
        f"input: {docs} records, {mb:.1f} MB of extracted text, {kept} kept after filters; {args.repeats} repeats "
        f"after {args.warmup} warm-up runs"
    )
    print("\nper-phase throughput in one process (CPU time summed over tasks, 1 worker, median):")
    for phase, key, count in (
        ("extract", "cpu_extract_s", docs),
        ("filter", "cpu_filter_s", docs),
        ("dedup keys", "cpu_dedup_keys_s", kept),
        ("dedup join", "dedup_s", kept),
    ):
        seconds = median(1, key)
        print(f"  {phase:<11} {count / seconds:9.0f} docs/s  {mb / seconds:7.2f} MB/s  ({seconds:.2f} s)")
    print("\nwall time per phase, median (s):")
    print(f"  {'phase':<22} {'1 worker':>9} {'2 workers':>10} {'ratio':>7}")
    for phase, key in (
        ("extract+filter+keys", "extract_filter_s"),
        ("dedup", "dedup_s"),
        ("split+mix+write", "mix_write_s"),
        ("whole stage", "wall"),
    ):
        one, two = median(1, key), median(2, key)
        print(f"  {phase:<22} {one:9.2f} {two:10.2f} {one / two:6.2f}x")


if __name__ == "__main__":
    main()
