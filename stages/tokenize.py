"""tokenize: encode every corpus shard into Arrow IPC token shards, one parallel task per shard.

Each document is encoded with the sentencepiece model and followed by the end-of-text id; a shard's tokens are one
flat column (uint16 when the vocabulary fits, else uint32) written as a single record batch so training can
memory-map it without copying, and a companion index file holds each document's start, length and source.
Layout: `train/<shard>.tokens.arrow`, `train/<shard>.index.arrow`, the same under `validation/`, and
`tokens.json` (vocabulary size, dtype, token counts per split and per source).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm

from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 1
SPLITS = ("train", "validation")
TOKENS_SUFFIX = ".tokens.arrow"
INDEX_SUFFIX = ".index.arrow"


@dataclass
class TokenizeConfig:
    batch_docs: int = 256  # documents encoded per sentencepiece call
    task_bytes: int = 1_000_000  # corpus shards are grouped into tasks of about this many (compressed) bytes

    def validate(self) -> list[tuple[str, str]]:
        if self.batch_docs < 1 or self.task_bytes < 1:
            return [("batch_docs", "batch_docs and task_bytes must be >= 1")]
        return []


@dataclass
class ShardJob:
    source: str  # a Parquet shard of the corpus
    target: str  # the output path without suffix
    tokenizer: str
    end_of_text: int
    dtype: str
    batch_docs: int


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def encode_shard(job: ShardJob) -> dict[str, Any]:
    """Encode one Parquet shard; idempotent (an existing output is read back for its counts)."""
    tokens_path, index_path = Path(job.target + TOKENS_SUFFIX), Path(job.target + INDEX_SUFFIX)
    if not (tokens_path.exists() and index_path.exists()):
        sp = _processor(job.tokenizer)
        table = pq.ParquetFile(job.source).read(columns=["text", "source"])
        texts, sources = table.column("text").to_pylist(), table.column("source").to_pylist()
        encoded: list[list[int]] = []
        for start in range(0, len(texts), job.batch_docs):
            # One thread: the stage's parallelism is one task per CPU, not threads inside a task.
            encoded += sp.encode(texts[start : start + job.batch_docs], num_threads=1)
        lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)  # + end-of-text
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if encoded else np.empty(0, np.int64)
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(ids, (job.end_of_text,)) for ids in encoded),
            dtype=job.dtype,
            count=int(lengths.sum()),
        )
        _write_ipc(pa.table({"tokens": pa.array(flat)}), tokens_path)
        index = pa.table({"start": starts, "length": lengths, "source": pa.array(sources, pa.string())})
        _write_ipc(index, index_path)
    index = read_ipc(index_path)
    per_source: Counter = Counter()
    for source, length in zip(index.column("source").to_pylist(), index.column("length").to_pylist(), strict=True):
        per_source[source] += length
    return {"documents": index.num_rows, "tokens": sum(per_source.values()), "per_source": dict(per_source)}


@functools.cache
def _processor(model_file: str) -> spm.SentencePieceProcessor:
    """One loaded model per worker process, reused by every shard it encodes."""
    return spm.SentencePieceProcessor(model_file=model_file)


def encode_shards(jobs: list[ShardJob]) -> list[dict[str, Any]]:
    """One task's worth of shards (small shards are grouped so task overhead stays small)."""
    return [encode_shard(job) for job in jobs]


def group_by_size(jobs: list[ShardJob], task_bytes: int) -> list[list[ShardJob]]:
    groups: list[list[ShardJob]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size >= task_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += os.path.getsize(job.source)
    return [g for g in groups if g]


def _write_ipc(table: pa.Table, path: Path) -> None:
    """One record batch per file (contiguous buffers to memory-map), written under a temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, table.num_rows))
    os.replace(tmp, path)


def read_ipc(path: Path) -> pa.Table:
    """Memory-mapped: the returned columns point into the page cache, nothing is copied."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def run(cfg: TokenizeConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    corpus, tokenizer = inputs["crawl_mix"], inputs["tokenizer"]
    meta = json.loads((tokenizer / "tokenizer_meta.json").read_text())
    dtype = token_dtype(meta["vocab_size"])
    jobs = []
    for split in SPLITS:
        for shard in sorted((corpus / split).glob("*.parquet")):
            jobs.append(ShardJob(str(shard), str(out_dir / split / shard.stem), str(tokenizer / "tokenizer.model"),
                                 meta["special_ids"]["end_of_text"], dtype, cfg.batch_docs))  # fmt: skip
    if not any(Path(j.source).parent.name == "train" for j in jobs):
        raise GptlineError(f"{corpus / 'train'}: no Parquet shards to tokenize")
    grouped = ctx.map(encode_shards, group_by_size(jobs, cfg.task_bytes), desc="encode")
    results = [result for group in grouped for result in group]
    summary: dict[str, Any] = {
        "vocab_size": meta["vocab_size"],
        "dtype": dtype,
        "end_of_text": meta["special_ids"]["end_of_text"],
    }
    for split in SPLITS:
        mine = [r for j, r in zip(jobs, results, strict=True) if Path(j.source).parent.name == split]
        per_source: Counter = Counter()
        for r in mine:
            per_source.update(r["per_source"])
        summary[split] = {"shards": len(mine), "documents": sum(r["documents"] for r in mine),
                          "tokens": sum(r["tokens"] for r in mine), "tokens_per_source": dict(per_source)}  # fmt: skip
    (out_dir / "tokens.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    metrics = {"train_tokens": summary["train"]["tokens"], "validation_tokens": summary["validation"]["tokens"]}
    metrics.update({f"train_tokens/{s}": n for s, n in summary["train"]["tokens_per_source"].items()})
    return metrics


def report(directory: Path) -> list[dict[str, Any]]:
    """Tokens per source in each split."""
    summary = json.loads((directory / "tokens.json").read_text())
    names = sorted(set().union(*(summary[split]["tokens_per_source"] for split in SPLITS)))
    return [
        {
            "kind": "bars",
            "title": "tokens per source",
            "categories": names,
            "y_label": "tokens",
            "series": {split: [summary[split]["tokens_per_source"].get(n, 0) for n in names] for split in SPLITS},
        }
    ]
