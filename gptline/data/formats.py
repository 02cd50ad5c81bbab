"""The files one stage writes and another reads: names and (de)serialisers shared by stages, the training library and
evaluation, so no stage imports another stage's private file layout.

- Token shards (tokenize -> pretrain, ppo's pretraining mix, evaluate): `<name>.tokens.arrow`, one flat `tokens`
  column written as a single record batch (memory-mapped without copying), with `<name>.index.arrow` beside it
  (each document's start, length and source).
- Ragged arrays (sft's `examples.npz`, rm's `comparisons.npz`): columns of variable-length arrays as concatenated
  values plus offsets in one .npz, read without pickle.
- sft's held-out prompts (`prompts.jsonl`, ppo's default prompts) and rm's held-out reward statistics
  (`reward_stats.json`, what ppo normalizes rewards by).
"""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa

TOKENS_SUFFIX = ".tokens.arrow"
INDEX_SUFFIX = ".index.arrow"
EXAMPLES = "examples.npz"  # sft: {split}_ids, {split}_trained
PROMPTS = "prompts.jsonl"  # sft: the held-out conversations up to their last answer
COMPARISONS = "comparisons.npz"  # rm: {split}_chosen, {split}_rejected, {split}_weight
REWARD_STATS = "reward_stats.json"  # rm: mean and std of the held-out rewards


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def write_ipc(table: pa.Table, path: Path) -> None:
    """One record batch per file (contiguous buffers to memory-map), written under a temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=max(1, table.num_rows))
    os.replace(tmp, path)


def read_ipc(path: Path) -> pa.Table:
    """Memory-mapped: the returned columns point into the page cache, nothing is copied."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def save_ragged(path: Path, columns: dict[str, list[np.ndarray]]) -> None:
    """Columns of variable-length arrays as concatenated values + offsets in one .npz (read without pickle)."""
    arrays = {}
    for name, values in columns.items():
        arrays[f"{name}.values"] = np.concatenate(values) if values else np.empty(0)
        arrays[f"{name}.offsets"] = np.cumsum([0] + [len(v) for v in values])
    np.savez(path, **arrays)


def load_ragged(path: Path, *names: str) -> dict[str, list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        loaded = {name: (data[f"{name}.values"], data[f"{name}.offsets"]) for name in names}
    return {name: [values[a:b] for a, b in pairwise(offsets)] for name, (values, offsets) in loaded.items()}
