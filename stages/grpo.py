"""grpo: critic-free policy-gradient RL from the sft model (GRPO, Shao et al. 2024; RLOO, Ahmadian et al. 2024;
REINFORCE++, Hu 2025). A group of answers per prompt stands in for PPO's value model.

One iteration, on every worker of a Ray Train group (its share of `rollout_batch` prompts, each answered
`group_size` times, so a group never spans workers):
1. rollout: KV-cache sampling from the policy, seeded by (seed, iteration, rank) so a resumed run samples what the
   uninterrupted one did; the log-probs the ratios start from come from the logits that sampled each token;
2. score: a programmatic reward `module:function(texts, references) -> scores` (by default the exact-answer check
   of gptline.data.verifiable against each prompt record's `answer`), or the `rm` artifact (`reward: model`),
   normalized by its held-out statistics;
3. advantages, one per answer (`advantage`): grpo (score minus the group's mean, divided by the group's std with
   `scale_by_std`), rloo (minus the mean of the group's other answers) or reinforce++ (normalized over the batch);
4. the KL to the sft model (the reference), either as a k3 term in the loss (`kl.mode: loss`, coefficient
   `kl.coef`) or as a per-token reward penalty (`kl.mode: reward`: -coef * KL at every token, its rewards-to-go
   added to the advantage; with reinforce++ the token returns are normalized over the batch instead);
5. `epochs` passes over shuffled minibatches of answers: the clipped ratio objective aggregated per token or per
   answer (`aggregation`); answers cut off by the length limit leave the loss with `mask_truncated`.
Metrics per iteration: reward mean/std, KL to sft per answer, entropy, answer length, truncation rate, groups whose
answers all scored the same (no signal), clip fraction, approximate KL; `val_reward` (greedy answers to the
held-out prompts, scored by the same reward: accuracy for the exact-answer reward) every `eval_every`.
Checkpoints every `checkpoint_every` iterations give exact resume; the artifact is the policy, exported like sft's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptline.data.chat import ChatTemplate, Skipped
from gptline.data.readers import MAX_LINE_BYTES
from gptline.data.verifiable import held_out_reward, read_tasks
from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig
from gptline.model.gpt import GPT
from gptline.training.collectives import sum_over_ranks
from gptline.training.config import DeepSpeedConfig, OptimConfig
from gptline.training.driver import train
from gptline.training.fit import Schedule
from gptline.training.loaders import ExampleLoader
from gptline.training.log import log_sections
from gptline.training.rl import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    KL_ESTIMATORS,
    FrozenModels,
    aggregate,
    batch_normalized,
    call_reward,
    forward_logprobs,
    group_advantages,
    kl_terms,
    policy_loss,
    reward_function,
    rewards_to_go,
    sample_answers,
    token_rewards,
)
from gptline.training.supervised import generating
from gptline.training.worker import TrainedModel
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 1
KL_MODES = ("loss", "reward")


@dataclass
class GRPOKLConfig:
    coef: float = 0.04  # beta
    mode: str = "loss"  # a k3 term in the loss, or a per-token reward penalty
    estimator: str = "k3"  # of the per-token penalty (mode: reward) and of the logged KL; the loss term is k3

    def validate(self) -> list[tuple[str, str]]:
        if self.mode not in KL_MODES:
            return [("mode", f"must be one of {', '.join(KL_MODES)}, got {self.mode!r}")]
        if self.estimator not in KL_ESTIMATORS:
            return [("estimator", f"must be one of {', '.join(KL_ESTIMATORS)}, got {self.estimator!r}")]
        return [] if self.coef >= 0 else [("coef", f"must be >= 0, got {self.coef}")]


@dataclass
class GRPOConfig:
    prompts: list[str] = field(default_factory=lambda: ["{fetch}/arithmetic/train.jsonl"])
    eval_prompts: list[str] = field(default_factory=lambda: ["{fetch}/arithmetic/held_out.jsonl"])
    max_line_bytes: int = MAX_LINE_BYTES  # a longer JSONL line is skipped and counted, never read whole
    reward: str = "gptline.data.verifiable:exact_answer"  # or "model": the rm artifact
    normalize_reward: bool = True  # reward: model; by the RM artifact's held-out mean and std
    iterations: int = 20
    rollout_batch: int = 8  # prompts per iteration, over all workers
    group_size: int = 8  # answers per prompt (G)
    minibatch: int = 16  # answers per update, over all workers
    epochs: int = 1  # passes over each iteration's answers
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=16, temperature=1.0))
    advantage: str = "grpo"  # grpo | rloo | reinforce++
    scale_by_std: bool = True  # grpo: divide by the group's std
    kl: GRPOKLConfig = field(default_factory=GRPOKLConfig)
    clip_ratio: float = 0.2
    aggregation: str = "token"  # token | sequence
    mask_truncated: bool = False  # answers that hit max_new_tokens without ending take no part in the loss
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0, weight_decay=0.0)
    )
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval_every: int = 5
    eval_limit: int = 200  # held-out prompts answered per evaluation
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    num_samples: int = 4  # answers shown per iteration
    seed: int = 0

    def validate(self) -> list[tuple[str, str]]:
        keys = ("iterations", "rollout_batch", "minibatch", "epochs", "eval_every", "checkpoint_every",
                "keep_checkpoints", "max_line_bytes")  # fmt: skip
        problems = at_least(self, 2, "group_size") + at_least(self, 1, *keys)
        problems += at_least(self, 0, "eval_limit", "num_samples")
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            problems.append(("advantage", f"must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {self.advantage!r}"))
        if self.aggregation not in AGGREGATIONS:
            problems.append(("aggregation", f"must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"))
        if self.clip_ratio <= 0:
            problems.append(("clip_ratio", "must be > 0"))
        answers = self.rollout_batch * self.group_size
        if answers % self.minibatch:
            problems.append(("minibatch", f"must divide rollout_batch x group_size = {answers}, got {self.minibatch}"))
        if self.reward != "model" and ":" not in self.reward:
            problems.append(("reward", f"must be 'model' or 'package.module:function', got {self.reward!r}"))
        return problems


# ---- the stage ------------------------------------------------------------------------------------------------
def fitting_tasks(tasks, template: ChatTemplate, key: str, room: int, context: int):
    """(prompt ids, reference) of every task; a prompt that leaves no room for `room` answer tokens is an error."""
    encoded = []
    for where, messages, answer in tasks:
        ids = template.prompt(messages)
        if len(ids) + room > context:
            raise GptlineError(
                f"{key}: {where}: a prompt of {len(ids)} tokens leaves no room for grpo.sampling.max_new_tokens="
                f"{room} in the sft model's context of {context}"
            )
        encoded.append((ids, answer))
    return encoded


def run(cfg: GRPOConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    world = ctx.resources.num_workers
    for key, value in (("rollout_batch", cfg.rollout_batch), ("minibatch", cfg.minibatch)):
        if value % world:
            raise GptlineError(f"grpo.{key}={value} is not divisible by {world} workers")
    if cfg.reward == "model" and "rm" not in inputs:
        raise GptlineError("grpo.reward=model needs the rm artifact as an input")
    template = ChatTemplate(inputs["sft"])
    context = json.loads((inputs["sft"] / "config.json").read_text())["gptline"]["max_seq_len"]
    skipped = Skipped()
    paths = {k: str(v) for k, v in inputs.items()}
    tasks = read_tasks([p.format(**paths) for p in cfg.prompts], "grpo.prompts", skipped, cfg.max_line_bytes)
    held_out = read_tasks(
        [p.format(**paths) for p in cfg.eval_prompts], "grpo.eval_prompts", skipped, cfg.max_line_bytes
    )
    room = cfg.sampling.max_new_tokens
    train_tasks = fitting_tasks(tasks, template, "grpo.prompts", room, context)
    eval_tasks = fitting_tasks(held_out[: cfg.eval_limit], template, "grpo.eval_prompts", room, context)
    if len(train_tasks) < cfg.rollout_batch:
        raise GptlineError(f"grpo.prompts: {len(train_tasks)} prompts, grpo.rollout_batch={cfg.rollout_batch} needs "
                           "at least that many")  # fmt: skip
    if cfg.reward != "model":  # fails here, before workers start: an import error, a wrong count, a bad reference
        probe = train_tasks[: cfg.group_size] + eval_tasks[:1]
        try:
            call_reward(reward_function(cfg.reward, "grpo.reward"), [""] * len(probe), [r for _, r in probe],
                        "grpo.reward")  # fmt: skip
        except (ValueError, TypeError) as e:
            raise GptlineError(f"grpo.reward={cfg.reward!r} fails on the prompts' records: {e}") from None
    recipe = GRPORecipe(cfg, str(inputs["sft"]), str(inputs.get("rm", "")), tuple(train_tasks), tuple(eval_tasks),
                        world)  # fmt: skip
    if not ctx.quiet:
        print(f"[grpo] {len(train_tasks)} prompts ({sum(skipped.counts.values())} bad), {len(eval_tasks)} held out, "
              f"{cfg.iterations} iterations of {cfg.rollout_batch} x {cfg.group_size} answers", flush=True)  # fmt: skip
    schedule = Schedule(cfg.iterations, cfg.eval_every, 1, cfg.checkpoint_every, cfg.keep_checkpoints)
    final = train("grpo", recipe, schedule, cfg.deepspeed, cfg.seed, ctx, out_dir)
    return {**final, "prompts": len(train_tasks), "held_out_prompts": len(eval_tasks)}


@dataclass
class Experience:
    """One rollout of G answers per prompt, scored: what the updates train on."""

    tokens: torch.Tensor  # (B * G, P + R)
    mask: torch.Tensor
    start: int
    answer_mask: torch.Tensor  # answer tokens, through the stop token
    loss_mask: torch.Tensor  # the answer tokens that enter the loss (truncated answers masked out on request)
    texts: list[str]
    ended: torch.Tensor
    scores: torch.Tensor
    logprobs: torch.Tensor  # under the policy that sampled
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor  # per answer token, with kl.estimator
    advantages: torch.Tensor  # per answer token


def token_advantages(scores, kl, answer_mask, cfg: GRPOConfig) -> torch.Tensor:
    """Step 3 and, with kl.mode=reward, 4: the per-token advantages."""
    if cfg.kl.mode == "reward" and cfg.advantage == "reinforce++":
        returns = rewards_to_go(token_rewards(scores, kl, answer_mask, cfg.kl.coef), answer_mask)
        return batch_normalized(returns, answer_mask)
    advantages = group_advantages(scores, cfg.group_size, cfg.advantage, cfg.scale_by_std)[:, None] * answer_mask
    if cfg.kl.mode == "reward":
        advantages = advantages + rewards_to_go(-cfg.kl.coef * kl, answer_mask)
    return advantages


@torch.no_grad()
def rollout(policy: GPT, frozen: FrozenModels, prompts: list[list[int]], references: list[str | None],
            cfg: GRPOConfig, generator: torch.Generator) -> Experience:  # fmt: skip
    """Steps 1-4 for prompts already repeated G times (each group consecutive)."""
    template = frozen.template
    s = sample_answers(policy, prompts, cfg.sampling, template.end_of_turn, template.ids["pad"], generator)
    device = s.answer_mask.device
    texts = [template.decode(a) for a in s.answers]
    scores = frozen.scores(prompts, s.answers, texts, references).to(device)
    ref_logp = frozen.reference_logprobs(s.tokens, s.mask, s.start, cfg.sampling.temperature).to(device)
    kl = kl_terms(s.logprobs, ref_logp, cfg.kl.estimator) * s.answer_mask
    advantages = token_advantages(scores, kl, s.answer_mask, cfg)
    loss_mask = s.answer_mask * s.ended[:, None].float() if cfg.mask_truncated else s.answer_mask
    return Experience(s.tokens, s.mask, s.start, s.answer_mask, loss_mask, texts, s.ended, scores, s.logprobs,
                      ref_logp, s.entropy, kl, advantages)  # fmt: skip


def update(policy, exp: Experience, cfg: GRPOConfig, minibatch: int, shuffle: torch.Generator) -> torch.Tensor:
    """Step 5: `epochs` passes over shuffled minibatches, one optimizer step per minibatch. Returns the mean policy
    loss, KL loss, clip fraction and approximate KL."""
    stats, updates = torch.zeros(4, dtype=torch.float64), 0
    kl_in_loss = cfg.kl.mode == "loss" and cfg.kl.coef > 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(exp.texts), generator=shuffle)
        for lo in range(0, len(order), minibatch):
            idx = order[lo : lo + minibatch]
            mask = exp.loss_mask[idx]
            logp = forward_logprobs(policy, exp.tokens[idx], exp.mask[idx], exp.start, cfg.sampling.temperature)
            p_loss, p_stats = policy_loss(logp, exp.logprobs[idx], exp.advantages[idx], mask, cfg.clip_ratio,
                                          cfg.aggregation)  # fmt: skip
            kl_loss = aggregate(kl_terms(logp, exp.ref_logprobs[idx], "k3"), mask, cfg.aggregation)
            policy.backward(p_loss + cfg.kl.coef * kl_loss if kl_in_loss else p_loss)
            policy.step()
            stats += torch.tensor([float(p_loss.detach()), float(kl_loss.detach()), float(p_stats["policy_clipfrac"]),
                                   float(p_stats["approx_kl"])])  # fmt: skip
            updates += 1
    return stats / updates


def iteration_metrics(exp: Experience, stats: torch.Tensor, group_size: int, world: int) -> dict[str, float]:
    """The iteration's figures over every rank's answers."""
    m = exp.answer_mask
    groups = exp.scores.view(-1, group_size)
    flat = float((groups.max(-1).values == groups.min(-1).values).sum())
    sums = sum_over_ranks([
        float(len(exp.texts)), float(exp.scores.sum()), float((exp.scores**2).sum()), float(exp.kl.sum()),
        float(m.sum()), float((exp.entropy * m).sum()), float((~exp.ended).sum()), flat, float(groups.shape[0]),
        *stats.tolist(),
    ])  # fmt: skip
    total, reward_sum, reward_sq, kl_sum, token_count, entropy_sum, cut, flat_groups, group_count = sums[:9]
    mean_reward = reward_sum / total
    record = {
        "reward_mean": mean_reward,
        "reward_std": math.sqrt(max(0.0, reward_sq / total - mean_reward**2)),
        "kl": kl_sum / total,  # per answer, summed over its tokens
        "entropy": entropy_sum / token_count,
        "answer_length": token_count / total,
        "truncated_rate": cut / total,
        "flat_groups": flat_groups / group_count,  # every answer scored the same: no learning signal
    }
    names = ("policy_loss", "kl_loss", "policy_clipfrac", "approx_kl")
    record.update((name, v / world) for name, v in zip(names, sums[9:], strict=True))
    return record


@dataclass(frozen=True)
class GRPORecipe:
    cfg: GRPOConfig
    sft: str
    rm: str  # "" with a programmatic reward
    prompts: tuple  # (prompt ids, reference answer) to train on
    held_out: tuple  # (prompt ids, reference answer) to measure on
    world: int

    def models(self) -> dict[str, TrainedModel]:
        return {"policy": TrainedModel(load(Path(self.sft)), self.cfg.optim, self.cfg.minibatch // self.world)}

    def task(self, engines: dict[str, Any], rank: int, world: int) -> GRPOTask:
        return GRPOTask(self, engines["policy"], rank, world)

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        final = GPT(load(Path(self.sft)).cfg)
        final.load_state_dict(weights["policy"])
        export(final, out_dir, Path(self.sft), ChatTemplate(Path(self.sft)).ids)


class GRPOTask:
    """One step is one iteration: a rollout of G answers to each of this rank's prompts, then the updates."""

    headline = ("reward_mean", "kl", "val_reward", "answer_length")
    flops_per_token = 0.0

    def __init__(self, recipe: GRPORecipe, policy, rank: int, world: int):
        cfg = self.cfg = recipe.cfg
        self.policy, self.rank, self.world = policy, rank, world
        self.frozen = FrozenModels(recipe.sft, recipe.rm or None, cfg.reward, cfg.normalize_reward, key="grpo.reward")
        self.template = self.frozen.template
        self.prompts = ExampleLoader(list(recipe.prompts), list, cfg.rollout_batch // world, rank, world, cfg.seed,
                                     what="prompts", drop_last=True)  # fmt: skip
        self.held_out = list(recipe.held_out)[rank::world]
        self.shown: list[str] = []

    def step(self, step: int) -> dict[str, float]:
        cfg, iteration = self.cfg, step + 1
        batch = [t for t in next(self.prompts) if t is not None]
        prompts = [ids for ids, _ in batch for _ in range(cfg.group_size)]
        references = [answer for _, answer in batch for _ in range(cfg.group_size)]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration * 1009 + self.rank)
        exp = rollout(self.policy.module, self.frozen, prompts, references, cfg, generator)
        shuffle = torch.Generator().manual_seed(cfg.seed * 7919 + iteration)
        stats = update(self.policy, exp, cfg, cfg.minibatch // self.world, shuffle)
        figures = iteration_metrics(exp, stats, cfg.group_size, self.world)
        if self.rank == 0:
            answered = list(zip(prompts, exp.texts, exp.scores, strict=True))[: cfg.num_samples]
            self.shown = [f"{float(s):+.3f} {self.template.decode(p[-40:])!r} -> {t!r}" for p, t, s in answered]
        return {**figures, "tokens": int(exp.answer_mask.sum())}

    def evaluate(self) -> dict[str, float]:
        """The held-out reward of greedy answers, over every rank's share of the held-out prompts (a programmatic
        reward only: the reward model's scores are not a held-out measure of anything but itself)."""
        if self.frozen.function is None:
            return {}

        def reward(texts: list[str], references: list[str | None]) -> list[float]:
            return call_reward(self.frozen.function, texts, references, "grpo.reward").tolist()

        greedy = SamplingConfig(max_new_tokens=self.cfg.sampling.max_new_tokens, temperature=0.0)
        with generating(self.policy.module) as model:
            mean = held_out_reward(model, self.template, self.held_out, reward, greedy)
        total, count = sum_over_ranks([mean * len(self.held_out), float(len(self.held_out))])
        return {"val_reward": total / count} if count else {}

    def samples(self) -> list[str]:
        return self.shown

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"reward_first": records[0]["reward_mean"]}

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])


def report(directory: Path) -> list[dict[str, Any]]:
    """Reward, held-out reward, KL, entropy, answer length and clipping per iteration; the last answers."""
    return log_sections(directory, [("reward", ("reward_mean", "val_reward")), ("KL to sft", ("kl",)),
                                    ("entropy", ("entropy",)), ("answer length", ("answer_length",)),
                                    ("groups without signal", ("flat_groups", "truncated_rate")),
                                    ("clipping", ("policy_clipfrac", "approx_kl"))])  # fmt: skip
