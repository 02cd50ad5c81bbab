"""tokenize: encode the corpus shards into Arrow IPC token shards, in parallel tasks of about `task_bytes` each.

The Parquet shards of each split are grouped, in order, into tasks of about `task_bytes` (compressed bytes): a
corpus of big shards gets one task per shard, a corpus of many small ones (the default) a few tasks of several
shards each, so per-file and per-task overheads stay small. A task's documents are encoded with the tokenizer (the
tokenizer stage's, or an imported model's), each followed by the end-of-text id, into one token shard: a flat column (uint16 when the vocabulary fits,
else uint32) written as a single record batch so training can memory-map it without copying, and a companion index
file holding each document's start, length and source. The grouping depends only on the corpus and the config, so a
resumed run plans the same tasks and skips those whose outputs exist.
With the tokenizer stage's model, a document is encoded in word-aligned pieces of about `PIECE_CHARS` characters
(see `word_aligned_pieces`), which gives exactly the ids of encoding it whole, about 1.3x faster: sentencepiece's BPE
slows down per character as a text grows (its merge queue spans the whole text), and web documents run to 100k
characters. Another tokenizer encodes each document whole.
Layout: `train/<first shard>.tokens.arrow`, `train/<first shard>.index.arrow`, the same under `validation/`, and
`tokens.json` (vocabulary size, dtype, token counts per split and per source).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gptline.data.formats import INDEX_SUFFIX, TOKENS_SUFFIX, read_ipc, token_dtype, write_ipc
from gptline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 2
SPLITS = ("train", "validation")
PIECE_CHARS = 512  # measured fastest between 256 and 1024 on the default corpus; 64 already pays per-call overhead


@dataclass
class TokenizeConfig:
    task_bytes: int = 256_000  # a split's shards are grouped into tasks of about this many (compressed) bytes

    def validate(self) -> list[tuple[str, str]]:
        if self.task_bytes < 1:
            return [("task_bytes", "must be >= 1")]
        return []


@dataclass
class EncodeTask:
    split: str
    shards: list[str]  # consecutive Parquet shards of one split, encoded in order into one token shard
    target: str  # the output path without suffix
    tokenizer: str  # its directory
    end_of_text: int
    dtype: str


def encode_shards(task: EncodeTask) -> dict[str, Any]:
    """Encode one task's shards into one token shard; idempotent (an existing output is read back for its counts)."""
    tokens_path, index_path = Path(task.target + TOKENS_SUFFIX), Path(task.target + INDEX_SUFFIX)
    if not (tokens_path.exists() and index_path.exists()):
        tokenizer = _tokenizer(task.tokenizer)
        table = pa.concat_tables(_read_text(shard) for shard in task.shards)
        # Python ints for one document at a time: a shard of a real crawl holds hundreds of millions of tokens.
        documents = [np.array(encode_document(tokenizer, text, task.end_of_text), dtype=task.dtype)
                     for text in table.column("text").to_pylist()]  # fmt: skip
        lengths = np.array([len(d) for d in documents], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        tokens = np.concatenate(documents) if documents else np.empty(0, dtype=task.dtype)
        write_ipc(pa.table({"tokens": pa.array(tokens)}), tokens_path)
        source = table.column("source").cast(pa.string())
        write_ipc(pa.table({"start": starts, "length": lengths, "source": source}), index_path)
    index = read_ipc(index_path)
    per_source: Counter = Counter()
    for source, length in zip(index.column("source").to_pylist(), index.column("length").to_pylist(), strict=True):
        per_source[source] += length
    return {"documents": index.num_rows, "tokens": sum(per_source.values()), "per_source": dict(per_source)}


def encode_document(tokenizer: Tokenizer, text: str, end_of_text: int) -> list[int]:
    """The ids of `text` then end-of-text, one word-aligned piece per call when the tokenizer allows it
    (sentencepiece's batch call, on the one thread a task has, measured ~10% slower)."""
    ids: list[int] = []
    for piece in word_aligned_pieces(text) if tokenizer.splits_at_spaces else [text]:
        ids += tokenizer.encode(piece)
    ids.append(end_of_text)
    return ids


def word_aligned_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters, each cut just before a run of spaces.

    Encoding the pieces one by one gives exactly the ids of encoding `text` whole, for a model trained as the tokenizer
    stage trains it (split by whitespace, whitespace as a word's prefix, runs of whitespace allowed as pieces, no dummy
    prefix, no whitespace removal): every piece of its vocabulary lies inside one word, a word being a run of spaces
    and the characters up to the next run, so nothing merges across such a cut. A literal '▁' (U+2581, what the
    normalizer turns a space into) counts as a space.
    """
    start = 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and text[cut - 1] in " \u2581":  # inside a run: the run starts earlier
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _read_text(shard: str) -> pa.Table:
    """A shard's text and source columns (one thread: a task has one CPU; ParquetFile skips the dataset layer)."""
    with pq.ParquetFile(shard) as parquet:
        return parquet.read(columns=["text", "source"], use_threads=False)


@functools.cache
def _tokenizer(directory: str) -> Tokenizer:
    """One loaded tokenizer per worker process, reused by every shard it encodes."""
    return load_tokenizer(Path(directory))


@dataclass
class ShardGroup:
    shards: list[Path]
    bytes: int  # their Parquet files' sizes together


def group_by_size(shards: list[Path], task_bytes: int) -> list[ShardGroup]:
    """Consecutive runs of shards of about `task_bytes` each (a shard at least `task_bytes` is a task of its own)."""
    groups: list[ShardGroup] = []
    for shard in shards:
        if not groups or groups[-1].bytes >= task_bytes:
            groups.append(ShardGroup([], 0))
        groups[-1].shards.append(shard)
        groups[-1].bytes += shard.stat().st_size
    return groups


def run(cfg: TokenizeConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    corpus, tokenizer = inputs["crawl_mix"], inputs["tokenizer"]
    meta = json.loads((tokenizer / "tokenizer_meta.json").read_text())
    dtype = token_dtype(meta["vocab_size"])
    end_of_text = meta["special_ids"]["end_of_text"]
    groups = [(split, group) for split in SPLITS
              for group in group_by_size(sorted((corpus / split).glob("*.parquet")), cfg.task_bytes)]  # fmt: skip
    # Largest first (LPT): a shard bigger than task_bytes is a task of its own, and one of those handed out last
    # would leave the other workers idle while it runs. Each task writes its own files; the order is free.
    groups.sort(key=lambda split_group: -split_group[1].bytes)
    tasks = [EncodeTask(split, [str(s) for s in group.shards], str(out_dir / split / group.shards[0].stem),
                        str(tokenizer), end_of_text, dtype) for split, group in groups]  # fmt: skip
    if not any(task.split == "train" for task in tasks):
        raise GptlineError(f"{corpus / 'train'}: no Parquet shards to tokenize")
    results = ctx.map(encode_shards, tasks, desc="encode")
    summary: dict[str, Any] = {
        "vocab_size": meta["vocab_size"],
        "dtype": dtype,
        "end_of_text": end_of_text,
    }
    for split in SPLITS:
        mine = [r for task, r in zip(tasks, results, strict=True) if task.split == split]
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
