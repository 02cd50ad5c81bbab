"""The preference losses against a worked example computed here by hand: two pairs (the second weighted 0.5, as a
pair of a 3-way ranking is), losses and the gradient with respect to each policy log-probability."""

from __future__ import annotations

import math

import pytest
import torch

from gptline.training.preference import PairLogProbs, PreferenceLossConfig, preference_losses, weighted_mean

# pair 1: policy chosen/rejected -10/-12, reference -11/-11, answers of 4 and 6 tokens
# pair 2: policy chosen/rejected -8/-5, reference -9/-6, answers of 2 and 5 tokens
POLICY = [[-10.0, -12.0], [-8.0, -5.0]]
REFERENCE = [[-11.0, -11.0], [-9.0, -6.0]]
LENGTHS = [[4.0, 6.0], [2.0, 5.0]]
WEIGHTS = [1.0, 0.5]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def run(cfg: PreferenceLossConfig):
    """The weighted loss, d loss / d policy log-probs (chosen, rejected of pair 1, then of pair 2), and the implicit
    rewards."""
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    ref, lengths = torch.tensor(REFERENCE, dtype=torch.float64), torch.tensor(LENGTHS, dtype=torch.float64)
    pairs = PairLogProbs(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], lengths[:, 0], lengths[:, 1])
    out = preference_losses(cfg, pairs)
    loss = weighted_mean(out.losses, torch.tensor(WEIGHTS, dtype=torch.float64))
    loss.backward()
    return loss.item(), policy.grad.flatten().tolist(), out.chosen_rewards.tolist(), out.rejected_rewards.tolist()


def test_dpo_sigmoid_with_label_smoothing_matches_the_worked_example():
    # h = (chosen ratio) - (rejected ratio): pair 1 (1) - (-1) = 2, pair 2 (1) - (1) = 0; beta 0.5: z = 1 and 0
    loss, grad, chosen, rejected = run(PreferenceLossConfig("sigmoid", beta=0.5, label_smoothing=0.1))
    pair1 = -0.9 * math.log(sigmoid(1.0)) - 0.1 * math.log(sigmoid(-1.0))
    pair2 = math.log(2.0)  # z = 0: -log(1/2) whatever the smoothing
    assert loss == pytest.approx((1.0 * pair1 + 0.5 * pair2) / 1.5, abs=1e-12)
    # d pair loss / dz = -0.9 sigmoid(-z) + 0.1 sigmoid(z); dz / d chosen = beta, dz / d rejected = -beta
    d1, d2 = -0.9 * sigmoid(-1.0) + 0.1 * sigmoid(1.0), -0.9 * 0.5 + 0.1 * 0.5
    expected = [0.5 * d1 / 1.5, -0.5 * d1 / 1.5, 0.5 * 0.5 * d2 / 1.5, -0.5 * 0.5 * d2 / 1.5]
    assert grad == pytest.approx(expected, abs=1e-12)
    assert chosen == pytest.approx([0.5, 0.5]) and rejected == pytest.approx([-0.5, 0.5])  # beta (policy - ref)


def test_dpo_without_smoothing_is_minus_log_sigmoid():
    loss, grad, _, _ = run(PreferenceLossConfig("sigmoid", beta=0.5))
    assert loss == pytest.approx((math.log(1 + math.exp(-1.0)) + 0.5 * math.log(2.0)) / 1.5, abs=1e-12)
    assert grad[0] == pytest.approx(-0.5 * sigmoid(-1.0) / 1.5, abs=1e-12)


def test_ipo_matches_the_worked_example():
    # length-averaged ratios: pair 1 1/4 - (-1)/6 = 5/12, pair 2 1/2 - 1/5 = 3/10; target 1 / (2 beta) = 1
    loss, grad, _, _ = run(PreferenceLossConfig("ipo", beta=0.5))
    assert loss == pytest.approx(((5 / 12 - 1) ** 2 + 0.5 * (3 / 10 - 1) ** 2) / 1.5, abs=1e-12)
    # d (h - 1)^2 / d chosen = 2 (h - 1) / |y_w|; / d rejected = -2 (h - 1) / |y_l|
    expected = [2 * (5 / 12 - 1) / 4 / 1.5, -2 * (5 / 12 - 1) / 6 / 1.5,
                0.5 * 2 * (3 / 10 - 1) / 2 / 1.5, -0.5 * 2 * (3 / 10 - 1) / 5 / 1.5]  # fmt: skip
    assert grad == pytest.approx(expected, abs=1e-12)


def test_simpo_is_reference_free_and_length_normalized():
    # per-token log-probs: pair 1 -10/4 = -2.5 vs -12/6 = -2; pair 2 -8/2 = -4 vs -5/5 = -1
    # z = beta (chosen - rejected) - gamma with beta 2, gamma 0.5: pair 1 -1.5, pair 2 -6.5
    loss, grad, chosen, rejected = run(PreferenceLossConfig("simpo", beta=2.0, target_margin=0.5))
    assert loss == pytest.approx((math.log(1 + math.exp(1.5)) + 0.5 * math.log(1 + math.exp(6.5))) / 1.5, abs=1e-12)
    # d -log sigmoid(z) / dz = -sigmoid(-z); dz / d chosen = beta / |y_w|
    expected = [-sigmoid(1.5) * 2 / 4 / 1.5, sigmoid(1.5) * 2 / 6 / 1.5,
                -0.5 * sigmoid(6.5) * 2 / 2 / 1.5, 0.5 * sigmoid(6.5) * 2 / 5 / 1.5]  # fmt: skip
    assert grad == pytest.approx(expected, abs=1e-12)
    assert chosen == pytest.approx([-5.0, -8.0]) and rejected == pytest.approx([-4.0, -2.0])  # beta log pi / |y|


def test_bad_settings_are_refused_by_key():
    assert PreferenceLossConfig("kto").validate()[0][0] == "kind"
    assert PreferenceLossConfig(beta=0).validate()[0][0] == "beta"
    assert PreferenceLossConfig("ipo", label_smoothing=0.1).validate()[0][0] == "label_smoothing"
    assert PreferenceLossConfig(label_smoothing=0.5).validate()[0][0] == "label_smoothing"
