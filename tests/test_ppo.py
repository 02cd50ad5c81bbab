"""PPO: the algorithm's pieces against hand computations, and the stage end to end on Ray Train with a
programmatic reward (reward rises, KL stays bounded, a large beta pins the policy to the reference, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptline.model.export import export
from gptline.model.gpt import GPT, ModelConfig, ScalarModel
from gptline.training import rl
from pipeline.config import typed
from pipeline.dag import StageContext, StageResources
from pipeline.errors import GptlineError
from stages import ppo
from tests.identical import assert_identical_artifacts
from tests.test_tokenizer import shakespeare_docs, train_tokenizer


# ---- the algorithm -----------------------------------------------------------------------------------------
def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding: its value must not leak in
    gamma, lam = 0.9, 0.8
    d2 = 2.0 + 0 - 0.2
    d1 = 0.0 + gamma * 0.2 - 1.0
    d0 = 1.0 + gamma * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 0.2, 0.0])


def test_kl_estimators_and_per_token_rewards():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert rl.kl_terms(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    r = torch.exp(ref - logp)
    assert rl.kl_terms(logp, ref, "k3").tolist() == pytest.approx((r - 1 - torch.log(r)).tolist())
    assert (rl.kl_terms(logp, ref, "k3") >= 0).all()  # k3 is never negative, unlike k1
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    rewards = rl.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25, -0.25 - 1.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_policy_ratio_and_value_clipping():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 1.5]))
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4)
    loss, stats = rl.policy_loss(new, old, advantages, mask, clip=0.2)
    # ratio 1.5, A>0: clipped to 1.2; ratio 0.5, A<0: clipped to 0.8 (pessimistic max of -A*r terms);
    # ratio 1.1: inside; ratio 1.5, A<0: the unclipped -A*r = 1.5 is the larger, kept.
    expected = [-1.2, 0.8, -1.1, 1.5]
    assert float(loss) == pytest.approx(sum(expected) / 4)
    assert float(stats["policy_clipfrac"]) == pytest.approx(0.5)
    ratio = torch.tensor([1.5, 0.5, 1.1, 1.5])
    assert float(stats["approx_kl"]) == pytest.approx(float((ratio - 1 - ratio.log()).mean()))

    values, old_values, returns = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])
    v_loss, v_stats = ppo.value_loss(values, old_values, returns, torch.ones(2), clip=0.2)
    # Both moved 1.0 from the old value toward the return; clipped to 1.2 and 0.8 the error is 0.8^2 each.
    assert float(v_loss) == pytest.approx(0.5 * 0.64) and float(v_stats["value_clipfrac"]) == 1.0


def test_whitening_is_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = rl.whiten(x, mask)
    real = white[mask.bool()]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-6) and float(real.std(unbiased=False)) == pytest.approx(1.0)
    assert float(white[0, 3]) == 0.0


def test_missing_end_of_turn_penalty_and_kl_controller():
    scores = ppo.apply_missing_end_penalty(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), 0.5)
    assert scores.tolist() == [1.0, 0.5]
    fixed = ppo.KLController(ppo.KLConfig(coef=0.1))
    fixed.update(100.0, 64)
    assert fixed.beta == 0.1
    adaptive = ppo.KLController(ppo.KLConfig(coef=0.1, adaptive=True, target=6.0, horizon=100))
    adaptive.update(12.0, 50)  # KL twice the target: the error is clipped to 0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 0.5))
    adaptive.update(3.0, 50)
    assert adaptive.beta == pytest.approx(0.1 * 1.1 * (1 - 0.2 * 0.5))


def test_answer_batch_aligns_prompts_left_and_answers_right():
    tokens, mask, start, answer_mask = rl.answer_batch([[5, 6, 7], [8]], [[9, 2], [10, 11, 2]], pad=0)
    assert start == 3
    assert tokens.tolist() == [[5, 6, 7, 9, 2, 0], [0, 0, 8, 10, 11, 2]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert answer_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


# ---- the stage ----------------------------------------------------------------------------------------------
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 96, "multiple_of": 32}
RUN = {"iterations": 16, "rollout_batch": 16, "minibatch": 8, "ppo_epochs": 2, "checkpoint_every": 4,
       "sampling": {"max_new_tokens": 12, "temperature": 1.0}, "missing_end_penalty": 0.0,
       "reward": "tests.ppo_rewards:e_fraction", "kl": {"coef": 0.02},
       "policy_optim": {"lr": 3e-3, "warmup_steps": 0}, "value_optim": {"lr": 1e-3, "warmup_steps": 0}}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("ppo-inputs"))


def build_models(tmp: Path) -> dict[str, Path]:
    """A tokenizer, a random 'SFT' policy and 'RM' exported like the stages' artifacts, and a prompt file."""
    tmp.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(tmp, shakespeare_docs()[:800], vocab_size=400)
    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    cfg = ModelConfig(**MODEL, vocab_size=meta["vocab_size"])
    torch.manual_seed(0)
    export(GPT(cfg), tmp / "sft", tok, meta["special_ids"])
    export(ScalarModel(cfg), tmp / "rm", tok, meta["special_ids"])
    (tmp / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    lines = [json.dumps({"prompt": f"Tell me of {w}."}) for w in ("kings", "queens", "ghosts", "wars", "storms",
             "love", "death", "fools", "Rome", "Venice", "the sea", "the moon", "a horse", "a ring", "honour",
             "Denmark")] + ['{"messages": [{"role": "user", "content": "And then?"}]}', '{"prompt": ""}']  # fmt: skip
    (tmp / "sft" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return {"sft": tmp / "sft", "rm": tmp / "rm"}


def run_ppo(models, out: Path, workers: int = 2, gpus: float = 0.0, **overrides) -> dict:
    out.mkdir(parents=True)
    cfg = typed(ppo.PPOConfig, {**RUN, **overrides})
    resources = StageResources(num_workers=workers, gpus_per_worker=gpus)
    return ppo.run(cfg, models, out, StageContext("ppo", resources=resources, quiet=True))


def curve(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_reward_rises_while_kl_stays_bounded_and_a_large_beta_holds_the_policy(models, tmp_path, ray_session):
    final = run_ppo(models, tmp_path / "free")
    rewards, kls = curve(tmp_path / "free", "reward_mean"), curve(tmp_path / "free", "kl")
    print("reward", [round(r, 3) for r in rewards], "\nkl", [round(k, 3) for k in kls])
    # 16 answers an iteration make one iteration's mean noisy (+-0.1 here): compare the first and last four
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3
    assert max(kls) < 15.0  # nats per 12-token answer
    assert final["entropy_first"] > 0 and final["entropy"] > 0 and final["prompts"] == 17
    run_ppo(models, tmp_path / "held", kl={"coef": 5.0})
    held_rewards, held_kls = curve(tmp_path / "held", "reward_mean"), curve(tmp_path / "held", "kl")
    print("beta 5: reward", [round(r, 3) for r in held_rewards], "\nkl", [round(k, 3) for k in held_kls])
    # Over the last four iterations too: the held policy's KL is under a nat, and under half the free one's
    assert sum(held_kls[-4:]) / 4 < min(1.0, sum(kls[-4:]) / 4 / 2)
    assert sum(held_rewards[-4:]) < sum(rewards[-4:])


def test_frozen_models_in_separate_actors_give_the_colocated_run(models, tmp_path, ray_session):
    """The reference and reward model as Ray actors of their own (placement=separate) compute exactly what they do
    inside the training workers; here with the real reward-model path (scores normalized by reward_stats.json)."""
    short = {"iterations": 2, "reward": "model", "missing_end_penalty": 1.0}
    run_ppo(models, tmp_path / "colocated", **short)
    run_ppo(models, tmp_path / "separate", placement="separate", frozen_resources={"num_cpus": 0}, **short)
    for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
        assert curve(tmp_path / "colocated", key) == pytest.approx(curve(tmp_path / "separate", key), abs=1e-6)


@pytest.mark.slow
def test_resume_mid_ppo_reproduces_the_uninterrupted_run(models, tmp_path, ray_session):
    short = {"iterations": 8}
    run_ppo(models, tmp_path / "straight", **short)
    (ray_session.fault_dir / "ppo.after_checkpoint_4").touch()
    run_ppo(models, tmp_path / "resumed", **short)
    assert not (ray_session.fault_dir / "ppo.after_checkpoint_4").exists()
    for key in ("reward_mean", "kl", "policy_loss"):
        a, b = curve(tmp_path / "straight", key), curve(tmp_path / "resumed", key)
        assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6
    wa, wb = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


UNVERSIONED_CHANGES = {"checkpoint_every": 1, "keep_checkpoints": 1, "num_samples": 0}  # see tests/test_versioning.py


def test_unversioned_fields_leave_the_artifact_unchanged(models, tmp_path, ray_session):
    run_ppo(models, tmp_path / "a", workers=1, iterations=2)
    run_ppo(models, tmp_path / "b", workers=1, iterations=2, **UNVERSIONED_CHANGES)
    assert_identical_artifacts(tmp_path / "a", tmp_path / "b")


def test_bad_config_fails_before_workers_start(models, tmp_path):
    with pytest.raises(GptlineError, match="ppo.reward='tests.nothing:here': cannot import"):
        run_ppo(models, tmp_path / "a", reward="tests.nothing:here")
    with pytest.raises(GptlineError, match="ppo.rollout_batch=64 needs at least that many"):
        run_ppo(models, tmp_path / "b", rollout_batch=64, minibatch=8)
