"""Supervised fine-tuning throughput, packed against padded: the sft stage as `gptline run` runs it on the default
chat data (the fetch stage's conversations), with `sft.packing=true` and `=false`, alternating round by round.

Both builds train on the same conversations in the same order (packing changes how a micro-batch's conversations
are laid out in rows, not which ones it holds), so the stage's logged `tokens_per_s` (assistant tokens trained, the
tokens the loss counts, per second) compares the real work done per second. Each round is a new seed, so both
builds run again on the same committed upstream artifacts; the first steps (warm-up) and the last (which evaluates,
samples and checkpoints) are left out. The pretrained model upstream is short-trained: its weights do not change the
cost of a step.

    python -m bench.sft_packing [--rounds 3] [--steps 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.train_loop import gptline_run, machine
from pipeline.artifacts import Store

WARMUP_STEPS = 3
UPSTREAM = ["pretrain.steps=20", "pretrain.eval_every=20", "pretrain.sample_every=20", "pretrain.checkpoint_every=20"]


def sft_tokens_per_s(store: Path, packing: bool, steps: int, seed: int, workers: int) -> tuple[float, dict]:
    """Median tokens/s of one sft build, and the padding shares its data.json reports."""
    overrides = [*UPSTREAM, f"sft.packing={str(packing).lower()}", f"sft.steps={steps}", f"sft.eval_every={steps}",
                 f"sft.sample_every={steps}", f"sft.checkpoint_every={steps}", f"sft.seed={seed}",
                 f"cluster.resources.sft.num_workers={workers}"]  # fmt: skip
    gptline_run(store, overrides, until="sft")
    artifact = max(Store(str(store)).list("sft"), key=lambda a: a.manifest["timings"]["end"])
    directory = Path(artifact.path)
    records = [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records[WARMUP_STEPS:-1]]
    return statistics.median(rates), json.loads((directory / "data.json").read_text())["padding"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per build")
    parser.add_argument("--workers", type=int, default=2, help="sft's worker group (the default run uses 2)")
    args = parser.parse_args()
    print(f"machine: {machine('cpu')}; sft on the default chat data, {args.workers} workers, {args.steps} steps per "
          f"build, {args.rounds} rounds; times the whole stage loop (`gptline run --until sft`)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        ratios, shares = [], {}
        for round_ in range(args.rounds):
            seed = 2000 + round_
            packed, shares = sft_tokens_per_s(store, True, args.steps, seed, args.workers)
            padded, _ = sft_tokens_per_s(store, False, args.steps, seed, args.workers)
            ratios.append(packed / padded)
            print(f"  round {round_}: packed {packed:.0f} tokens/s, padded {padded:.0f} tokens/s, "
                  f"packed/padded {packed / padded:.2f}x", flush=True)  # fmt: skip
        print(f"padding in the first epoch's micro-batches: padded rows {shares['padded']:.0%}, packed rows "
              f"{shares['packed']:.0%}", flush=True)  # fmt: skip
        print(f"sft packed/padded, assistant tokens per second: {statistics.median(ratios):.2f}x (median of rounds; "
              "target >= 1.5x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
