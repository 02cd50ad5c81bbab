"""Packed training rows from memory-mapped token shards, split across data-parallel ranks, resumable exactly.

The shards of a split are one logical token stream (documents already separated by end-of-text). Row i holds the
inputs at positions [i*T, i*T + T) and the targets at the same positions + 1, so every position 0..N-2 is an input
exactly once per epoch; the last row may be short and is padded (pad inputs, `ignore_index` targets). Each epoch
visits the rows in a permutation fixed by (seed, epoch). Step k of the epoch takes the k-th block of W*B rows of
that order, and rank r takes its r-th slice of B rows: ranks never overlap and, together, leave no gap; when the
row count is not a multiple of W*B the last step is completed with empty rows (all targets ignored) so every rank
takes the same number of steps.

The position is (epoch, step); `state_dict()` / `load_state_dict()` carry it, so a restored loader yields exactly
what the uninterrupted one would have, on any world size with the same global batch W*B. `EpochLoader` holds this
order and position; `PackedLoader` serves packed token rows with it and `ExampleLoader` whole examples (sft, rm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gptline.data.formats import TOKENS_SUFFIX
from gptline.model.gpt import IGNORE_INDEX
from pipeline.errors import GptlineError


class TokenStream:
    """All token shards of a directory, memory-mapped and addressed as one array (no copy until sliced)."""

    def __init__(self, directory: Path):
        paths = sorted(Path(directory).glob("*" + TOKENS_SUFFIX))
        if not paths:
            raise GptlineError(f"{directory}: no token shards (*{TOKENS_SUFFIX})")
        self.arrays = []
        for path in paths:
            column = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().column("tokens")
            self.arrays.append(column.combine_chunks().to_numpy(zero_copy_only=True) if column.num_chunks != 1
                               else column.chunk(0).to_numpy(zero_copy_only=True))  # fmt: skip
        self.paths = paths
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])])
        self.total = int(self.offsets[-1])

    def max_token(self) -> int:
        return max((int(a.max()) for a in self.arrays if len(a)), default=-1)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, across shard boundaries."""
        out = np.empty(max(0, stop - start), dtype=np.int64)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        written, shard = 0, first
        while written < len(out):
            lo = start + written - self.offsets[shard]
            piece = self.arrays[shard][lo : lo + len(out) - written]
            out[written : written + len(piece)] = piece
            written += len(piece)
            shard += 1
        return out


class EpochLoader:
    """The order every loader shares: items visited in a permutation fixed by (seed, epoch); step k takes the k-th
    block of W*B items and rank r its r-th slice of B; the last step is completed with empty items (index -1) so
    every rank takes the same number of steps. Subclasses turn a slice of indices into a batch (`collate`)."""

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 require_full_batch: bool, what: str, unit: str, drop_last: bool = False):  # fmt: skip
        if not 0 <= rank < world_size:
            raise GptlineError(f"rank {rank} is not in a world of {world_size}")
        self.num_items, self.batch_size, self.rank, self.world_size = num_items, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.global_rows = batch_size * world_size
        if require_full_batch and num_items < self.global_rows:
            raise GptlineError(f"{what}; a global batch of {world_size} ranks x {batch_size} {unit} needs at "
                               f"least {self.global_rows}")  # fmt: skip
        # drop_last: every step full, the epoch's last partial block left out (a different one each epoch)
        steps = num_items // self.global_rows if drop_last else math.ceil(num_items / self.global_rows)
        self.steps_per_epoch = max(1, steps)
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    def collate(self, indices: np.ndarray) -> Any:
        raise NotImplementedError

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items) if self.shuffle
                     else np.arange(self.num_items))  # fmt: skip
            padding = max(0, self.steps_per_epoch * self.global_rows - self.num_items)
            self._order, self._order_epoch = np.concatenate([order, np.full(padding, -1)]), self.epoch
        return self._order

    def rows_for(self, epoch: int, step: int, rank: int) -> np.ndarray:
        """Item indices (-1: empty) that `rank` takes at (epoch, step)."""
        saved = self.epoch
        self.epoch = epoch
        order = self._epoch_order()
        self.epoch = saved
        first = step * self.global_rows + rank * self.batch_size
        return order[first : first + self.batch_size]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        """The next batch, forever (epochs follow each other)."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        indices = self.rows_for(self.epoch, self.step, self.rank)
        self.step += 1
        return self.collate(indices)

    def epoch_batches(self) -> Iterator[Any]:
        """The rest of the current epoch (evaluation: one pass, in order when shuffle is off)."""
        while self.step < self.steps_per_epoch:
            yield next(self)

    def rewind(self) -> None:
        self.epoch, self.step = 0, 0

    def identity(self) -> dict[str, int]:
        """What a saved position is only valid for."""
        return {"seed": self.seed, "global_rows": self.global_rows, "num_rows": self.num_items}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, **self.identity()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in self.identity().items():
            if state[key] != value:
                raise GptlineError(f"cannot resume the data loader: saved {key}={state[key]}, this run has {value}")
        self.epoch, self.step = state["epoch"], state["step"]


class PackedLoader(EpochLoader):
    def __init__(
        self,
        stream: TokenStream,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        pad_id: int = 0,
        shuffle: bool = True,
        require_full_batch: bool = True,  # evaluation passes False: a small split is padded with empty rows
    ):
        self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id
        self.num_rows = math.ceil(max(0, stream.total - 1) / seq_len)
        what = f"{len(stream.paths)} token shard(s) hold {stream.total} tokens = {self.num_rows} rows of {seq_len}"
        super().__init__(self.num_rows, batch_size, rank, world_size, seed, shuffle, require_full_batch, what, "rows")

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        if index >= 0:
            start = index * self.seq_len
            window = self.stream.slice(start, min(start + self.seq_len + 1, self.stream.total))
            inputs[: len(window) - 1] = window[:-1]
            targets[: len(window) - 1] = window[1:]
        return inputs, targets

    def collate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of shape (B, T)."""
        rows = [self.row(int(i)) for i in indices]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def identity(self) -> dict[str, int]:
        return {"seq_len": self.seq_len, **super().identity()}


class ExampleLoader(EpochLoader):
    """Batches of whole examples (a list of items), collated by the stage's function; empty slots are None."""

    def __init__(self, items: list[Any], collate: Callable[[list[Any]], Any], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, require_full_batch: bool = True,
                 what: str = "examples", drop_last: bool = False):  # fmt: skip
        self.items, self._collate = items, collate
        super().__init__(len(items), batch_size, rank, world_size, seed, shuffle, require_full_batch,
                         f"{len(items)} {what}", what, drop_last)  # fmt: skip

    def collate(self, indices: np.ndarray) -> Any:
        return self._collate([self.items[i] if i >= 0 else None for i in indices])


def training_row(ids: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of one example: a target is the next token where the template trains it, else ignored."""
    return ids[:-1], np.where(trained[1:], ids[1:], IGNORE_INDEX)


def collate_examples(
    examples: list[tuple[np.ndarray, np.ndarray] | None], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (inputs, targets); an empty slot (the end of an epoch) is one padding row."""
    rows = [training_row(*e) if e is not None else (np.array([pad_id]), np.array([IGNORE_INDEX])) for e in examples]
    width = max(len(inputs) for inputs, _ in rows)
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, (x, y) in enumerate(rows):
        inputs[i, : len(x)], targets[i, : len(y)] = x, y
    return inputs, targets


def pad_rows(rows: list[np.ndarray], pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) with every row padded to the longest, on the right or the left."""
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[i, span], mask[i, span] = row, 1
    return tokens, mask


@dataclass(frozen=True)
class PackedRows:
    """Sequences packed into rows: `columns` are the rows of each aligned column (tokens, targets, ...), `segments`
    numbers the sequences in each row from 1 (0: padding), and sequence i sits in row `row[i]` from `start[i]`."""

    columns: tuple[np.ndarray, ...]
    segments: np.ndarray
    row: np.ndarray
    start: np.ndarray


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` per row, longest first into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fits is None:
            rows.append([])
            room.append(capacity)
            fits = len(rows) - 1
        rows[fits].append(i)
        room[fits] -= lengths[i]
    return rows


def pack_rows(sequences: list[tuple[np.ndarray, ...]], capacity: int, fills: tuple[int, ...]) -> PackedRows:
    """Pack sequences (each a tuple of equal-length arrays, one per column) into rows of at most `capacity` tokens,
    each padded with its column's `fill` to the longest row. The rows are as few as first-fit decreasing finds at
    `capacity`, and as short as it can keep that count: the row width is the cost (every row is computed to it),
    so a micro-batch of 300 tokens goes into two rows of about 150, not one of 256 and one of 44."""
    lengths = [len(s[0]) for s in sequences]
    rows = first_fit_decreasing(lengths, capacity)
    target = max(max(lengths), math.ceil(sum(lengths) / len(rows)))  # no row count can beat this width
    while target < capacity:  # the narrowest width (in steps of capacity/64) that keeps the row count
        tighter = first_fit_decreasing(lengths, target)
        if len(tighter) == len(rows):
            rows = tighter
            break
        target += max(1, capacity // 64)
    width = max(sum(lengths[i] for i in row) for row in rows)
    columns = tuple(np.full((len(rows), width), fill, dtype=np.int64) for fill in fills)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    row_of, start_of = np.zeros(len(sequences), np.int64), np.zeros(len(sequences), np.int64)
    for r, members in enumerate(rows):
        offset = 0
        for segment, i in enumerate(members, start=1):
            span = slice(offset, offset + lengths[i])
            for column, values in zip(columns, sequences[i], strict=True):
                column[r, span] = values
            segments[r, span] = segment
            row_of[i], start_of[i] = r, offset
            offset += lengths[i]
    return PackedRows(columns, segments, row_of, start_of)


def collate_packed_examples(
    examples: list[tuple[np.ndarray, np.ndarray] | None], pad_id: int, capacity: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, segments): the micro-batch's examples packed into rows of at most `capacity` tokens (the
    same examples and targets as `collate_examples`, in fewer rows); an all-empty batch is one padding row."""
    rows = [training_row(*e) for e in examples if e is not None] or [(np.array([pad_id]), np.array([IGNORE_INDEX]))]
    packed = pack_rows(rows, capacity, (pad_id, IGNORE_INDEX))
    inputs, targets = packed.columns
    return inputs, targets, packed.segments


def collate_packed_sequences(sequences: list[np.ndarray], pad_id: int, capacity: int):
    """(tokens, segments, last): whole sequences packed into rows of at most `capacity` tokens, and where each
    sequence's last token sits (row, position), in the order given (a reward model reads its score there)."""
    packed = pack_rows([(s,) for s in sequences], capacity, (pad_id,))
    ends = packed.start + np.array([len(s) for s in sequences]) - 1
    return packed.columns[0], packed.segments, np.stack([packed.row, ends], axis=1)
