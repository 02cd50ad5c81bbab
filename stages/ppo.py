"""ppo: RLHF. The policy samples answers, the frozen reward model scores them, PPO updates the policy with a per-token
KL penalty against the frozen SFT model (InstructGPT; Ziegler et al. 2019), optionally mixing in pretraining loss.

Four models: the policy (from sft) and the value model (from rm: the same trunk, a scalar per position) are trained
with DeepSpeed engines; the reference (sft, frozen) and the reward model (rm, frozen) only score. Where the frozen
two live is config: `colocated` in every training worker, or `separate`: one Ray actor per worker with its own
resources (on a GPU cluster: their own devices), called with token batches.

One iteration, on every worker of a Ray Train group (its share of `rollout_batch` prompts):
1. rollout: batched KV-cache sampling from the policy (temperature, top-k/top-p, stop at end-of-turn), seeded by
   (seed, iteration, rank), so a resumed run samples exactly what the uninterrupted one did; the log-probs PPO's
   ratios start from are taken from the logits that sampled each token (no second forward pass);
2. score: the reward model reads prompt + answer + `<|reward|>` (an answer cut off by the length limit gets
   `<|end|>` appended there and `missing_end_penalty` subtracted), normalized by the RM artifact's held-out mean and
   std; or a programmatic reward `module:function(texts, references) -> scores` behind the same interface (tests,
   ablations; the sampler, log-probs, KL and rewards are gptline.training.rl's, shared with grpo);
3. per-token rewards: -beta * KL(policy || reference) at every answer token (estimator k1 = log p - log p_ref or
   k3 = (r - 1) - log r with r = p_ref / p) plus the score at the last one; beta fixed or adapted toward a
   target KL (Ziegler et al.'s proportional controller);
4. GAE (gamma, lambda) on the value model's estimates, advantages whitened over the batch;
5. `ppo_epochs` passes over shuffled minibatches: the clipped surrogate (ratio clipped to 1 +- clip_ratio), an
   optional entropy bonus and `ptx_coef` times the next-token loss on pretraining rows for the policy; the clipped
   value loss for the value model.
Metrics per iteration: reward mean/std, KL, entropy, answer length, clip fractions, approximate KL, value error,
beta, and sample answers with their rewards. Checkpoints (both engines, the prompt and pretraining loaders, the KL
controller) every `checkpoint_every` iterations give exact resume; the artifact is the policy, exported like sft's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptline.data.chat import ChatTemplate, Skipped, read_prompts
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig
from gptline.model.gpt import GPT, ScalarModel
from gptline.training.collectives import sum_over_ranks
from gptline.training.config import DeepSpeedConfig, OptimConfig
from gptline.training.driver import train
from gptline.training.fit import Schedule
from gptline.training.loaders import ExampleLoader, PackedLoader, TokenStream
from gptline.training.log import log_sections
from gptline.training.rl import (
    KL_ESTIMATORS,
    FrozenModels,
    forward_logprobs,
    kl_terms,
    masked_mean,
    policy_loss,
    reward_function,
    sample_answers,
    token_rewards,
    whiten,
)
from gptline.training.worker import TrainedModel
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError
from pipeline.versioning import unversioned

VERSION = 2
PLACEMENTS = ("colocated", "separate")


@dataclass
class KLConfig:
    coef: float = 0.05  # beta: the per-token penalty on log p - log p_ref
    estimator: str = "k1"
    adaptive: bool = False  # move beta so the KL per answer tracks `target`
    target: float = 6.0  # nats per answer
    horizon: int = 10000  # answers over which the controller acts (Ziegler et al.)

    def validate(self) -> list[tuple[str, str]]:
        if self.estimator not in KL_ESTIMATORS:
            return [("estimator", f"must be one of {', '.join(KL_ESTIMATORS)}, got {self.estimator!r}")]
        if self.coef < 0 or self.target <= 0 or self.horizon < 1:
            return [("coef", "needs coef >= 0, target > 0, horizon >= 1")]
        return []


@dataclass
class FrozenResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class PPOConfig:
    prompts: list[str] = field(default_factory=lambda: ["{sft}/prompts.jsonl"])
    max_line_bytes: int = MAX_LINE_BYTES  # a longer JSONL line is skipped and counted, never read whole
    iterations: int = 20
    rollout_batch: int = 16  # prompts per iteration, over all workers
    minibatch: int = 8  # answers per update, over all workers
    ppo_epochs: int = 2
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=32, temperature=1.0))
    kl: KLConfig = field(default_factory=KLConfig)
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    value_coef: float = 1.0
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    missing_end_penalty: float = 1.0  # subtracted from the score of an answer cut off without end-of-turn
    normalize_reward: bool = True  # by the RM artifact's held-out mean and std
    reward: str = "model"  # or "package.module:function", a programmatic reward over answer texts
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss mixed into every policy update
    ptx_batch: int = 4  # pretraining rows per worker per update
    policy_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0, weight_decay=0.0)
    )
    value_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-5, schedule="constant", warmup_steps=0, weight_decay=0.0)
    )
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    placement: str = "colocated"  # where the reference and reward models run: colocated | separate
    frozen_resources: FrozenResources = field(default_factory=FrozenResources)
    checkpoint_every: int = unversioned(5)  # PPO has no rollback: checkpoints serve resume alone
    keep_checkpoints: int = unversioned(2)
    num_samples: int = unversioned(4)  # answers shown per iteration
    seed: int = 0

    def validate(self) -> list[tuple[str, str]]:
        keys = ("iterations", "rollout_batch", "minibatch", "ppo_epochs", "checkpoint_every", "keep_checkpoints",
                "max_line_bytes")  # fmt: skip
        problems = at_least(self, 1, *keys) + at_least(self, 0, "ptx_coef", "entropy_coef", "num_samples")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append(("gamma", "needs 0 < gamma <= 1 and 0 <= lam <= 1"))
        if self.clip_ratio <= 0 or self.clip_value <= 0:
            problems.append(("clip_ratio", "clip_ratio and clip_value must be > 0"))
        if self.rollout_batch % self.minibatch:
            problems.append(("minibatch", f"must divide rollout_batch={self.rollout_batch}, got {self.minibatch}"))
        if self.placement not in PLACEMENTS:
            problems.append(("placement", f"must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}"))
        if self.reward != "model" and ":" not in self.reward:
            problems.append(("reward", f"must be 'model' or 'package.module:function', got {self.reward!r}"))
        return problems


# ---- the algorithm -------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over each row's answer tokens (mask 1), value 0 after the last one.
    Returns (advantages, returns = advantages + values)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def value_loss(values, old_values, returns, mask, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss: new values may move at most `clip` from the rollout's before the error counts."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}


class KLController:
    """Fixed beta, or Ziegler et al.'s proportional controller toward a target KL per answer."""

    def __init__(self, cfg: KLConfig):
        self.cfg, self.beta = cfg, cfg.coef

    def update(self, kl: float, answers: int) -> None:
        if self.cfg.adaptive:
            error = float(np.clip(kl / self.cfg.target - 1, -0.2, 0.2))
            self.beta *= 1 + error * answers / self.cfg.horizon


def apply_missing_end_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    return scores - penalty * (~ended).float()


class RemoteFrozenModels:
    """The same calls, answered by a Ray actor with its own resources."""

    def __init__(self, resources: FrozenResources, *args):
        import ray

        actor = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)(FrozenModels)
        self.actor = actor.remote(*args, max(1, int(resources.num_cpus)), "ppo.reward")
        self.template = ChatTemplate(Path(args[0]))

    def reference_logprobs(self, *args):
        import ray

        return ray.get(self.actor.reference_logprobs.remote(*args))

    def scores(self, *args):
        import ray

        return ray.get(self.actor.scores.remote(*args))


# ---- the stage ------------------------------------------------------------------------------------------------
def run(cfg: PPOConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    world = ctx.resources.num_workers
    for key, value in (("rollout_batch", cfg.rollout_batch), ("minibatch", cfg.minibatch)):
        if value % world:
            raise GptlineError(f"ppo.{key}={value} is not divisible by {world} workers")
    if cfg.reward != "model":
        reward_function(cfg.reward, "ppo.reward")  # fails here, before workers start, when it cannot be imported
    template = ChatTemplate(inputs["sft"])
    skipped = Skipped()
    patterns = [p.format(**{k: str(v) for k, v in inputs.items()}) for p in cfg.prompts]
    prompts = read_prompts(patterns, "ppo.prompts", skipped, cfg.max_line_bytes)
    context = json.loads((inputs["sft"] / "config.json").read_text())["gptline"]["max_seq_len"]
    # room for the answer, and for the end-of-turn and reward tokens the reward model reads after it
    fitting = [p for p in prompts if len(template.prompt(p)) + cfg.sampling.max_new_tokens + 2 <= context]
    if len(fitting) < cfg.rollout_batch:
        raise GptlineError(
            f"ppo.prompts: {len(fitting)} of {len(prompts)} prompts leave room for "
            f"ppo.sampling.max_new_tokens={cfg.sampling.max_new_tokens} in the context of {context}; "
            f"ppo.rollout_batch={cfg.rollout_batch} needs at least that many"
        )
    if cfg.ptx_coef > 0 and "tokenize" not in inputs:
        raise GptlineError("ppo.ptx_coef > 0 needs the tokenize artifact as an input")
    tokens = str(inputs["tokenize"]) if "tokenize" in inputs else None
    recipe = PPORecipe(cfg, str(inputs["sft"]), str(inputs["rm"]), tokens, tuple(fitting), world)
    if not ctx.quiet:
        print(f"[ppo] {len(fitting)} prompts ({len(prompts) - len(fitting)} too long, {sum(skipped.counts.values())} "
              f"bad), {cfg.iterations} iterations of {cfg.rollout_batch}", flush=True)  # fmt: skip
    # Every iteration's answers are its samples; nothing is held out to evaluate.
    schedule = Schedule(cfg.iterations, 0, 1, cfg.checkpoint_every, cfg.keep_checkpoints)
    final = train("ppo", recipe, schedule, cfg.deepspeed, cfg.seed, ctx, out_dir)
    return {**final, "prompts": len(fitting)}


def forward_values(model, tokens: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """V(s_t) for each answer token t: the value read where token t is predicted."""
    return model(tokens, attention_mask=mask)[:, start - 1 : -1]


@dataclass
class Experience:
    """One rollout, scored: what the PPO epochs train on and the iteration's metrics are taken from."""

    tokens: torch.Tensor  # (B, P + R): left-padded prompts, then right-padded answers
    mask: torch.Tensor  # real tokens
    start: int  # P: where answers begin
    answer_mask: torch.Tensor  # (B, R): answer tokens, through the stop token
    texts: list[str]
    ended: torch.Tensor  # answers that closed their turn
    raw_scores: torch.Tensor  # the reward model's (or function's) scores
    scores: torch.Tensor  # after the missing-end penalty
    logprobs: torch.Tensor  # under the policy that sampled
    entropy: torch.Tensor
    kl: torch.Tensor  # per answer token
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@torch.no_grad()
def rollout(policy: GPT, value: ScalarModel, frozen, prompts: list[list[int]], cfg: PPOConfig, beta: float,
            generator: torch.Generator) -> Experience:  # fmt: skip
    """Steps 1-4: sample answers, score them, per-token rewards with the KL penalty, advantages and returns."""
    template = frozen.template
    samples = sample_answers(policy, prompts, cfg.sampling, template.end_of_turn, template.ids["pad"], generator)
    answers, tokens, mask, start = samples.answers, samples.tokens, samples.mask, samples.start
    answer_mask, logp, token_entropy, ended = samples.answer_mask, samples.logprobs, samples.entropy, samples.ended
    device = answer_mask.device
    texts = [template.decode(a) for a in answers]
    raw_scores = frozen.scores(prompts, answers, texts).to(device)
    scores = apply_missing_end_penalty(raw_scores, ended, cfg.missing_end_penalty)
    ref_logp = frozen.reference_logprobs(tokens, mask, start, cfg.sampling.temperature).to(device)
    values = forward_values(value, tokens, mask, start) * answer_mask
    kl = kl_terms(logp, ref_logp, cfg.kl.estimator) * answer_mask
    advantages, returns = gae(token_rewards(scores, kl, answer_mask, beta), values, answer_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, answer_mask)
    return Experience(tokens, mask, start, answer_mask, texts, ended, raw_scores, scores, logp, token_entropy, kl,
                      values, advantages, returns)  # fmt: skip


def update(policy, value, exp: Experience, cfg: PPOConfig, minibatch: int, shuffle: torch.Generator,
           ptx: PackedLoader | None) -> torch.Tensor:  # fmt: skip
    """Step 5: `ppo_epochs` passes over shuffled minibatches, one optimizer step of each engine per minibatch.
    Returns the mean policy loss, value loss, policy and value clip fractions and approximate KL."""
    stats, updates = torch.zeros(5, dtype=torch.float64), 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(exp.texts), generator=shuffle)
        for lo in range(0, len(order), minibatch):
            idx = order[lo : lo + minibatch]
            tokens, mask, answer_mask = exp.tokens[idx], exp.mask[idx], exp.answer_mask[idx]
            bonus = cfg.entropy_coef > 0  # the full-vocabulary entropy only when it is in the loss
            out = forward_logprobs(policy, tokens, mask, exp.start, cfg.sampling.temperature, bonus)
            logp = out[0] if bonus else out
            p_loss, p_stats = policy_loss(logp, exp.logprobs[idx], exp.advantages[idx], answer_mask, cfg.clip_ratio)
            loss = p_loss - cfg.entropy_coef * masked_mean(out[1], answer_mask) if bonus else p_loss
            if ptx is not None:
                ptx_inputs, ptx_targets = (torch.from_numpy(a).to(tokens.device) for a in next(ptx))
                loss = loss + cfg.ptx_coef * policy(ptx_inputs, ptx_targets)[1]
            policy.backward(loss)
            policy.step()
            values = forward_values(value, tokens, mask, exp.start)
            v_loss, v_stats = value_loss(values, exp.values[idx], exp.returns[idx], answer_mask, cfg.clip_value)
            value.backward(cfg.value_coef * v_loss)
            value.step()
            stats += torch.tensor([float(p_loss.detach()), float(v_loss.detach()), float(p_stats["policy_clipfrac"]),
                                   float(v_stats["value_clipfrac"]), float(p_stats["approx_kl"])])  # fmt: skip
            updates += 1
    return stats / updates


def iteration_metrics(exp: Experience, stats: torch.Tensor, beta: float, world: int) -> dict[str, float]:
    """The iteration's figures over every rank's answers."""
    m = exp.answer_mask
    sums = sum_over_ranks([
        float(len(exp.texts)), float(exp.raw_scores.sum()), float((exp.raw_scores**2).sum()), float(exp.kl.sum()),
        float(m.sum()), float((exp.entropy * m).sum()), float((~exp.ended).sum()),
        float(((exp.values - exp.returns) ** 2 * m).sum()), float(exp.scores.sum()), *stats.tolist(),
    ])  # fmt: skip
    total, reward_sum, reward_sq, kl_sum, token_count, entropy_sum, cut, value_sq, score_sum = sums[:9]
    mean_reward = reward_sum / total
    record = {
        "reward_mean": mean_reward,
        "reward_std": math.sqrt(max(0.0, reward_sq / total - mean_reward**2)),
        "score_mean": score_sum / total,  # after the missing-end penalty
        "kl": kl_sum / total,  # per answer, summed over its tokens
        "entropy": entropy_sum / token_count,  # per answer token
        "answer_length": token_count / total,
        "missing_end_rate": cut / total,
        "value_error": value_sq / token_count,
        "beta": beta,
    }
    names = ("policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl")
    record.update((name, v / world) for name, v in zip(names, sums[9:], strict=True))
    return record


@dataclass(frozen=True)
class PPORecipe:
    cfg: PPOConfig
    sft: str
    rm: str
    tokens: str | None  # the token shards, for the pretraining mix
    prompts: tuple  # the conversations to answer, each leaving room for an answer
    world: int

    def models(self) -> dict[str, TrainedModel]:
        cfg, minibatch = self.cfg, self.cfg.minibatch // self.world
        policy = load(Path(self.sft))
        # A programmatic reward has no reward model to start the value model from: the policy's trunk does.
        value = ScalarModel.from_language_model(policy) if cfg.reward != "model" else load(Path(self.rm))
        return {"policy": TrainedModel(policy, cfg.policy_optim, minibatch),
                "value": TrainedModel(value, cfg.value_optim, minibatch, exported=False)}  # fmt: skip

    def task(self, engines: dict[str, Any], rank: int, world: int) -> PPOTask:
        return PPOTask(self, engines["policy"], engines["value"], rank, world)

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        final = GPT(load(Path(self.sft)).cfg)
        final.load_state_dict(weights["policy"])
        export(final, out_dir, Path(self.sft), ChatTemplate(Path(self.sft)).ids)


class PPOTask:
    """One step is one PPO iteration: a rollout on this rank's share of the prompts, then the updates."""

    headline = ("reward_mean", "kl", "entropy", "answer_length", "beta")
    flops_per_token = 0.0

    def __init__(self, recipe: PPORecipe, policy, value, rank: int, world: int):
        cfg = self.cfg = recipe.cfg
        self.policy, self.value, self.rank, self.world = policy, value, rank, world
        self.template = ChatTemplate(Path(recipe.sft))
        frozen_args = (recipe.sft, recipe.rm, cfg.reward, cfg.normalize_reward)
        self.frozen = (FrozenModels(*frozen_args, key="ppo.reward") if cfg.placement == "colocated"
                       else RemoteFrozenModels(cfg.frozen_resources, *frozen_args))  # fmt: skip
        self.prompts = ExampleLoader([self.template.prompt(p) for p in recipe.prompts], list,
                                     cfg.rollout_batch // world, rank, world, cfg.seed, what="prompts",
                                     drop_last=True)  # fmt: skip
        self.ptx = None
        if cfg.ptx_coef > 0:
            seq_len = policy.module.cfg.max_seq_len
            self.ptx = PackedLoader(TokenStream(Path(recipe.tokens) / "train"), cfg.ptx_batch, seq_len, rank, world,
                                    cfg.seed, self.template.ids["pad"])  # fmt: skip
        self.kl_control = KLController(cfg.kl)
        self.shown: list[str] = []

    def step(self, step: int) -> dict[str, float]:
        cfg, iteration = self.cfg, step + 1
        batch_prompts = [p for p in next(self.prompts) if p is not None]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration * 1009 + self.rank)
        beta = self.kl_control.beta
        exp = rollout(self.policy.module, self.value.module, self.frozen, batch_prompts, cfg, beta, generator)
        shuffle = torch.Generator().manual_seed(cfg.seed * 7919 + iteration)
        stats = update(self.policy, self.value, exp, cfg, cfg.minibatch // self.world, shuffle, self.ptx)
        figures = iteration_metrics(exp, stats, beta, self.world)
        self.kl_control.update(figures["kl"], int(cfg.rollout_batch))
        if self.rank == 0:
            answered = list(zip(batch_prompts, exp.texts, exp.raw_scores, strict=True))[: cfg.num_samples]
            self.shown = [f"{float(s):+.3f} {self.template.decode(p[-40:])!r} -> {t!r}" for p, t, s in answered]
        return {**figures, "tokens": int(exp.answer_mask.sum())}

    def evaluate(self) -> dict[str, float]:
        return {}

    def samples(self) -> list[str]:
        return self.shown

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"entropy_first": records[0]["entropy"], "reward_first": records[0]["reward_mean"]}

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.kl_control.beta, "prompts": self.prompts.state_dict(),
                "ptx": self.ptx.state_dict() if self.ptx is not None else None}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_control.beta = state["beta"]
        self.prompts.load_state_dict(state["prompts"])
        if self.ptx is not None:
            self.ptx.load_state_dict(state["ptx"])


def report(directory: Path) -> list[dict[str, Any]]:
    """Reward, KL, entropy, answer length, clipping and value error per iteration; the last answers and rewards."""
    return log_sections(directory, [("reward (normalized)", ("reward_mean", "score_mean")), ("KL to sft", ("kl",)),
                                    ("entropy", ("entropy",)), ("answer length", ("answer_length",)),
                                    ("clip fractions", ("policy_clipfrac", "value_clipfrac", "approx_kl")),
                                    ("value error", ("value_error",))])  # fmt: skip
