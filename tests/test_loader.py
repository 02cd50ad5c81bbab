"""The packed data loader: every token once per epoch on any world size, exact resume, clear errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gptline.data.formats import load_ragged, save_ragged, write_ipc
from gptline.training.loaders import IGNORE_INDEX, ExampleLoader, PackedLoader, TokenStream
from pipeline.errors import GptlineError

TOTAL = 10_007  # tokens; each token's value is its position, so a batch says exactly what it covers


@pytest.fixture
def stream(tmp_path: Path) -> TokenStream:
    bounds = [0, 3_001, 3_002, 7_500, TOTAL]  # uneven shards, one of a single token
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        write_ipc(pa.table({"tokens": pa.array(np.arange(lo, hi, dtype=np.uint16))}), tmp_path / f"s{i}.tokens.arrow")
    return TokenStream(tmp_path)


def served(loaders: list[PackedLoader], steps: int) -> np.ndarray:
    positions = []
    for _ in range(steps):
        for loader in loaders:
            inputs, targets = next(loader)
            valid = targets != IGNORE_INDEX
            assert np.array_equal(targets[valid], inputs[valid] + 1)  # targets are the inputs shifted by one
            positions.append(inputs[valid])
    return np.concatenate(positions)


def test_stream_addresses_shards_as_one_array(stream):
    assert stream.total == TOTAL and len(stream.arrays) == 4
    assert np.array_equal(stream.slice(2_990, 3_010), np.arange(2_990, 3_010))
    assert not stream.arrays[0].flags.owndata  # memory-mapped, not copied


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_position_is_served_exactly_once_per_epoch(stream, world_size):
    loaders = [
        PackedLoader(stream, batch_size=3, seq_len=64, rank=r, world_size=world_size, seed=1) for r in range(world_size)
    ]
    steps = loaders[0].steps_per_epoch
    assert all(lo.steps_per_epoch == steps for lo in loaders)  # ranks stay in lockstep
    positions = served(loaders, steps)
    assert np.array_equal(np.sort(positions), np.arange(TOTAL - 1))  # 0..N-2 once each: no overlap, no gap
    second_epoch = served(loaders, steps)
    assert np.array_equal(np.sort(second_epoch), np.arange(TOTAL - 1))
    assert not np.array_equal(positions, second_epoch)  # a new order each epoch


def test_restored_loader_continues_exactly(stream):
    straight = PackedLoader(stream, batch_size=4, seq_len=32, seed=3)
    expected = [next(straight) for _ in range(100)]  # crosses into the second epoch (79 steps each)
    first = PackedLoader(stream, batch_size=4, seq_len=32, seed=3)
    for _ in range(37):
        next(first)
    state = first.state_dict()
    resumed = PackedLoader(stream, batch_size=4, seq_len=32, seed=3)
    resumed.load_state_dict(state)
    for want in expected[37:]:
        got = next(resumed)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_resume_on_another_world_size_with_the_same_global_batch(stream):
    two = [PackedLoader(stream, batch_size=2, seq_len=50, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(10):
        for loader in two:
            next(loader)
    state = two[0].state_dict()
    four = [PackedLoader(stream, batch_size=1, seq_len=50, rank=r, world_size=4, seed=5) for r in range(4)]
    for loader in four:
        loader.load_state_dict(state)
    rows_two = np.concatenate([next(loader)[0] for loader in two])
    rows_four = np.concatenate([next(loader)[0] for loader in four])
    assert np.array_equal(rows_two, rows_four)


def test_errors_are_clear(stream, tmp_path):
    with pytest.raises(GptlineError, match=r"157 rows of 64; a global batch of 8 ranks x 20 rows needs at least 160"):
        PackedLoader(stream, batch_size=20, seq_len=64, world_size=8)
    loader = PackedLoader(stream, batch_size=2, seq_len=64)
    with pytest.raises(GptlineError, match="saved seq_len=64, this run has 32"):
        PackedLoader(stream, batch_size=2, seq_len=32).load_state_dict(loader.state_dict())
    with pytest.raises(GptlineError, match="no token shards"):
        TokenStream(tmp_path / "empty")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_examples_are_served_exactly_once_per_epoch_and_resume_exactly(world_size):
    items = list(range(37))
    loaders = [ExampleLoader(items, list, 3, rank, world_size, seed=5) for rank in range(world_size)]
    steps = loaders[0].steps_per_epoch
    served = [x for _ in range(steps) for loader in loaders for x in next(loader) if x is not None]
    assert sorted(served) == items
    straight = ExampleLoader(items, list, 3, 0, world_size, seed=5)
    expected = [next(straight) for _ in range(2 * steps)]
    first = ExampleLoader(items, list, 3, 0, world_size, seed=5)
    head = [next(first) for _ in range(steps + 1)]
    restored = ExampleLoader(items, list, 3, 0, world_size, seed=5)
    restored.load_state_dict(first.state_dict())
    assert head + [next(restored) for _ in range(steps - 1)] == expected


def test_ragged_columns_round_trip_without_pickle(tmp_path):
    columns = {"ids": [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4])],
               "flags": [np.array([True]), np.array([False, True])]}  # fmt: skip
    save_ragged(tmp_path / "r.npz", columns)
    loaded = load_ragged(tmp_path / "r.npz", "ids", "flags")
    assert all(np.array_equal(a, b) for name in columns for a, b in zip(loaded[name], columns[name], strict=True))
