"""Packing: several sequences share a row, attention stays inside each and positions restart, so losses and rewards
equal the padded path (one row per sequence) within 1e-5, in fewer rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptline.model.gpt import GPT, IGNORE_INDEX, ModelConfig, ScalarModel, rewards_at, rewards_at_last
from gptline.training.loaders import (
    collate_examples,
    collate_packed_examples,
    collate_packed_sequences,
    pack_rows,
    pad_rows,
)

CONTEXT = 64
PAD = 0


def model_config() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=CONTEXT, multiple_of=32)


def examples(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, trained) pairs of varied lengths; about half the tokens trained, as in a chat transcript."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(3, CONTEXT + 1))
        out.append((rng.integers(1, 97, length), rng.random(length) < 0.5))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_rows_hold_every_sequence_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    sequences = [(np.full(int(n), i),) for i, n in enumerate(rng.integers(1, 40, 30))]
    packed = pack_rows(sequences, 50, (-1,))
    (tokens,) = packed.columns
    assert tokens.shape[1] <= 50 and len(tokens) < len(sequences)
    for i, (values,) in enumerate(sequences):
        row, start = packed.row[i], packed.start[i]
        assert (tokens[row, start : start + len(values)] == values).all()
    assert (packed.segments > 0).sum() == sum(len(s[0]) for s in sequences)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_loss_and_gradients_equal_the_padded_path(seed):
    torch.manual_seed(seed)
    model = GPT(model_config())
    batch = [*examples(seed, 12), None]  # an empty slot, as at the end of an epoch
    padded = [torch.from_numpy(a) for a in collate_examples(batch, PAD)]
    packed = [torch.from_numpy(a) for a in collate_packed_examples(batch, PAD, CONTEXT)]
    assert packed[0].numel() < padded[0].numel()  # fewer slots to compute

    def loss_and_grads(inputs, targets, segments=None):
        model.zero_grad()
        loss = model(inputs, targets, segments=segments)[1]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    padded_loss, padded_grads = loss_and_grads(*padded)
    packed_loss, packed_grads = loss_and_grads(*packed)
    assert float(packed_loss) == pytest.approx(float(padded_loss), abs=1e-5)
    for a, b in zip(padded_grads, packed_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_packed_sequence_sees_only_itself_from_position_zero(seed):
    torch.manual_seed(seed)
    model = GPT(model_config()).eval()
    sequences = [ids for ids, _ in examples(seed, 6)]
    tokens, segments, last = (torch.from_numpy(a) for a in collate_packed_sequences(sequences, PAD, CONTEXT))
    with torch.no_grad():
        hidden = model.hidden(tokens, segments=segments)
        for i, ids in enumerate(sequences):
            alone = model.hidden(torch.from_numpy(ids)[None])[0]
            row, end = last[i]
            torch.testing.assert_close(hidden[row, end - len(ids) + 1 : end + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_rewards_equal_the_padded_rewards(seed):
    torch.manual_seed(seed)
    model = ScalarModel(model_config()).eval()
    reward_id = 96
    sequences = [np.append(ids[: CONTEXT - 1], reward_id) for ids, _ in examples(seed, 10)]
    with torch.no_grad():
        tokens, mask = (torch.from_numpy(a) for a in pad_rows(sequences, PAD))
        padded = rewards_at(model, tokens, mask, reward_id)
        packed = rewards_at_last(
            model, *(torch.from_numpy(a) for a in collate_packed_sequences(sequences, PAD, CONTEXT))
        )
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_an_all_empty_batch_is_one_padding_row():
    inputs, targets, segments = collate_packed_examples([None, None], PAD, CONTEXT)
    assert inputs.shape == (1, 1) and (targets == IGNORE_INDEX).all() and segments.shape == (1, 1)
