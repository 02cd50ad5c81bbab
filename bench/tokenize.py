"""Benchmark the tokenize stage: tokens/s with 2 Ray workers vs a single-process sentencepiece loop, side by side.

    python -m bench.tokenize [--store store] [--copies 4] [--repeats 5]   (as a module: the file name is also a stdlib one)

Input: the default corpus and tokenizer (the `crawl_mix` and `tokenizer` artifacts; built first with
`gptline run --until tokenizer` when absent), its train shards repeated `--copies` times so each run has enough
work. Measured in one process, alternating, medians of the repeats:
- the stage (`tokenize.run`, shards fanned out as Ray tasks, 2 workers and 1), end to end: Parquet read, encode,
  Arrow IPC write;
- a single-process `SentencePieceProcessor.encode` loop over the same texts, already in memory (encode only): one
  call per document, as a hand-written loop does; and a loop of the stage's `tokenize.encode_document`, one call per
  word-aligned piece (the same ids), which separates that gain from the workers';
- Hugging Face `tokenizers` (our exported tokenizer.json) `encode_batch` over the same texts, as a peer.
Each repeat runs the five back to back; a ratio is the median of the repeats' own ratios (this machine's speed
drifts by 10-20% over a minute, which a ratio of separate medians would mix in).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import sentencepiece as spm
from tokenizers import Tokenizer

from gptline.data.tokenizer import load_tokenizer
from pipeline.artifacts import Store
from pipeline.config import typed
from pipeline.dag import StageContext, StageResources
from pipeline.progress import Progress
from pipeline.runner import RayMap
from stages import tokenize


def artifacts(store: Path) -> tuple[Path, Path]:
    def latest(stage: str) -> list:
        return Store(str(store)).list(stage) if store.exists() else []

    if not latest("tokenizer"):
        subprocess.run(
            [sys.executable, "-m", "gptline", "run", f"store.root={store}", "--until", "tokenizer"], check=True
        )
    return Path(latest("crawl_mix")[-1].path), Path(latest("tokenizer")[-1].path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="store")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    corpus, tokenizer_dir = artifacts(Path(args.store).resolve())
    bench_corpus = Path(tempfile.mkdtemp(prefix="bench-tokenize-corpus-"))
    for split in ("train", "validation"):
        (bench_corpus / split).mkdir()
    for copy in range(args.copies):
        for shard in sorted((corpus / "train").glob("*.parquet")):
            shutil.copy(shard, bench_corpus / "train" / f"{shard.stem}-c{copy}.parquet")
    texts = pq.read_table(str(bench_corpus / "train"), columns=["text"]).column("text").to_pylist()
    chars = sum(len(t) for t in texts)

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokens = sum(len(ids) + 1 for ids in sp.encode(texts))  # + end-of-text per document, as the stage writes

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def stage(workers: int) -> float:
        out = Path(tempfile.mkdtemp(prefix="bench-tokenize-out-"))
        resources = StageResources(num_workers=workers, cpus_per_worker=1.0)
        ctx = StageContext(
            "tokenize", resources=resources, quiet=True, map=RayMap("tokenize", resources, Progress("quiet"))
        )
        start = time.perf_counter()
        metrics = tokenize.run(
            typed(tokenize.TokenizeConfig, {}), {"crawl_mix": bench_corpus, "tokenizer": tokenizer_dir}, out, ctx
        )
        seconds = time.perf_counter() - start
        assert metrics["train_tokens"] == tokens, (metrics["train_tokens"], tokens)
        shutil.rmtree(out)
        return seconds

    def sentencepiece_loop() -> float:
        start = time.perf_counter()
        for text in texts:
            sp.encode(text)
        return time.perf_counter() - start

    stage_tokenizer = load_tokenizer(tokenizer_dir)

    def sentencepiece_pieces_loop() -> float:
        start = time.perf_counter()
        for text in texts:
            tokenize.encode_document(stage_tokenizer, text, sp.eos_id())
        return time.perf_counter() - start

    def hf_batch() -> float:
        start = time.perf_counter()
        hf.encode_batch(texts, add_special_tokens=False)
        return time.perf_counter() - start

    stage(2)  # warm-up: Ray workers and imports
    times: dict[str, list[float]] = {"stage": [], "stage1": [], "loop": [], "pieces": [], "hf": []}
    for _ in range(args.repeats):
        times["stage"].append(stage(2))
        times["stage1"].append(stage(1))
        times["loop"].append(sentencepiece_loop())
        times["pieces"].append(sentencepiece_pieces_loop())
        times["hf"].append(hf_batch())
    ray.shutdown()
    shutil.rmtree(bench_corpus)

    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"input: {len(texts)} documents, {chars / 1e6:.1f} M characters, {tokens / 1e6:.2f} M tokens; {args.repeats} repeats"
    )
    rows = [
        ("tokenize stage, 2 Ray workers (read+encode+write)", "stage"),
        ("tokenize stage, 1 Ray worker (read+encode+write)", "stage1"),
        ("sentencepiece, 1 process loop (encode only)", "loop"),
        ("sentencepiece, 1 process loop over word-aligned pieces", "pieces"),
        ("HF tokenizers encode_batch (Rust threads)", "hf"),
    ]
    for label, key in rows:
        print(f"  {label:<56} {tokens / median[key] / 1e6:6.2f} M tokens/s  ({median[key]:.2f} s)")

    def ratio(slow: str, fast: str) -> float:  # of each repeat's back-to-back pair: robust to the machine's drift
        return statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))

    print("ratios, medians of the repeats' own:")
    print(f"  stage (2 workers) / sentencepiece loop: {ratio('loop', 'stage'):.2f}x (target >= 1.8x)")
    print(f"  stage 2 workers / 1 worker: {ratio('stage1', 'stage'):.2f}x")
    print(f"  word-aligned pieces / whole documents, 1 process loop: {ratio('loop', 'pieces'):.2f}x")
    print(f"  HF tokenizers / sentencepiece loop: {ratio('loop', 'hf'):.2f}x")


if __name__ == "__main__":
    main()
