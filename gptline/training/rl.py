"""Policy-gradient pieces the RL stages share (ppo with its value model, grpo without one).

- sampling: a batch of answers from the KV-cache sampler, with the log-prob and entropy of each sampled token taken
  from the logits that sampled it (no second forward pass), laid out as left-padded prompts then right-padded answers;
- log-probs of answer tokens under a model, KL estimators against a reference (k1, k3), masked statistics;
- the clipped ratio objective, aggregated per token (every answer token weighs the same) or per sequence (each
  answer's mean, then the mean over answers);
- critic-free advantages from one scalar score per answer: GRPO (the group's mean as baseline, optionally divided by
  the group's std), RLOO (the mean of the group's other answers), REINFORCE++ (normalized over the whole batch);
  rewards-to-go of a per-token KL penalty;
- rewards: a reward model artifact read at its reward token (normalized by its held-out statistics), or a
  programmatic function `module:function(texts, references) -> scores` (references: each prompt record's expected
  answer, None where it has none), both behind `FrozenModels.scores`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptline.data.chat import ChatTemplate
from gptline.data.formats import REWARD_STATS
from gptline.model.export import load
from gptline.model.generate import SamplingConfig, generate, temperature_scaled
from gptline.model.gpt import GPT, rewards_at_last
from gptline.training.collectives import sum_over_ranks
from gptline.training.loaders import collate_packed_sequences
from pipeline.errors import GptlineError

KL_ESTIMATORS = ("k1", "k3")
AGGREGATIONS = ("token", "sequence")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce++")


# ---- log-probs and KL -----------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool = False):
    """log p(token) under the sampling distribution (logits at t-1 predict token t; the caller aligns them), and
    with `with_entropy` the entropy of each position's distribution, from the same log-softmax."""
    logp = temperature_scaled(logits, temperature).log_softmax(-1)
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (picked, -(logp.exp() * logp).sum(-1)) if with_entropy else picked


def kl_terms(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimates on the sampled tokens (Schulman, "Approximating KL"): k1 =
    log p - log p_ref (unbiased, can be negative), k3 = (r - 1) - log r with r = p_ref / p (unbiased, never
    negative)."""
    if estimator == "k1":
        return logp - ref_logp
    log_ratio = ref_logp - logp  # r = p_ref / p
    return log_ratio.exp() - 1 - log_ratio


def forward_logprobs(model, tokens, mask, start: int, temperature: float, with_entropy: bool = False):
    """log p of each answer token under `model` (and the entropy of each answer position's distribution)."""
    logits, _ = model(tokens, attention_mask=mask, logits_from=start - 1)
    return token_logprobs(logits[:, :-1], tokens[:, start:], temperature, with_entropy)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """A (B, R) per-token quantity to a scalar: the mean over every answer token (`token`), or each answer's mean
    over its tokens, then the mean over answers (`sequence`; an answer with no token counts 0)."""
    if how == "token":
        return masked_mean(x, mask)
    per_answer = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_answer.mean()


def policy_loss(logp, old_logp, advantages, mask, clip: float, aggregation: str = "token"):
    """The clipped ratio objective; with the fraction of clipped tokens and the approximate KL(old || new)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    # Figures, not losses: no autograd graph behind them.
    stats = {"policy_clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approx_kl": masked_mean((ratio - 1 - log_ratio).detach(), mask)}  # fmt: skip
    return loss, stats


# ---- rewards per token and advantages --------------------------------------------------------------------------
def last_token(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last answer token."""
    return (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * KL at every answer token, plus the sequence score at the last one."""
    return -beta * kl * mask + last_token(mask) * score[:, None]


def rewards_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{s >= t} r_s over each row's answer tokens (gamma = 1), 0 outside them."""
    masked = rewards * mask
    return (masked.flip(-1).cumsum(-1).flip(-1)) * mask


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, scale_by_std: bool = True) -> torch.Tensor:
    """One advantage per answer from its score; answers come in consecutive groups of `group_size` per prompt.
    grpo: score - the group's mean, divided by the group's (unbiased) std when `scale_by_std`; rloo: score - the mean
    of the group's other answers; reinforce++: (score - the batch's mean) / the batch's std, over every rank."""
    if estimator == "reinforce++":
        ones = torch.ones_like(scores)
        return batch_normalized(scores, ones)
    groups = scores.view(-1, group_size)
    if estimator == "rloo":
        baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
        return (groups - baseline).reshape(-1)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(-1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def batch_normalized(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every rank's batch (population std)."""
    count, total, squares = sum_over_ranks([float(mask.sum()), float((x * mask).sum()), float((x**2 * mask).sum())])
    mean = total / max(count, 1.0)
    var = max(squares / max(count, 1.0) - mean**2, 0.0)
    return (x - mean) / (var + 1e-8) ** 0.5 * mask


# ---- sampling -------------------------------------------------------------------------------------------------
def answer_batch(prompts: list[list[int]], answers: list[list[int]], pad: int):
    """(tokens, mask, start, answer_mask) for prompts left-padded to P and answers right-padded to R."""
    width, length = max(len(p) for p in prompts), max(1, max(len(a) for a in answers))
    tokens = torch.full((len(prompts), width + length), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        tokens[i, width - len(p) : width], mask[i, width - len(p) : width] = torch.tensor(p), 1
        tokens[i, width : width + len(a)], mask[i, width : width + len(a)] = torch.tensor(a, dtype=torch.long), 1
    return tokens, mask, width, mask[:, width:].float()


@dataclass
class Samples:
    """Sampled answers to a batch of prompts, on the policy's device."""

    answers: list[list[int]]  # token ids, through the stop token when one was sampled
    tokens: torch.Tensor  # (B, P + R): left-padded prompts, then right-padded answers
    mask: torch.Tensor  # real tokens
    start: int  # P: where answers begin
    answer_mask: torch.Tensor  # (B, R): answer tokens, through the stop token
    logprobs: torch.Tensor  # of each answer token under the policy that sampled it
    entropy: torch.Tensor  # of each answer position's sampling distribution
    ended: torch.Tensor  # answers that closed their turn (the rest hit the length limit)


@torch.no_grad()
def sample_answers(policy: GPT, prompts: list[list[int]], sampling: SamplingConfig, end: int, pad: int,
                   generator: torch.Generator) -> Samples:  # fmt: skip
    """Answers from `policy` (left in training mode afterwards), stopping at `end`."""
    policy.eval()
    temperature = sampling.temperature
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(token: torch.Tensor, logits: torch.Tensor) -> None:
        # The log-prob of each sampled token under the sampling policy, from the logits that sampled it (no
        # second forward pass; tokens after a row's stop are masked out below)
        steps.append(token_logprobs(logits, token, temperature, with_entropy=True))

    answers = generate(policy, prompts, sampling, stop_ids=[end], pad_id=pad, generator=generator, on_step=record)
    policy.train()
    device = policy.lm_head.weight.device
    tokens, mask, start, answer_mask = answer_batch(prompts, answers, pad)
    tokens, mask, answer_mask = tokens.to(device), mask.to(device), answer_mask.to(device)
    logp, entropy = (torch.stack(column, dim=1).float() * answer_mask for column in zip(*steps, strict=True))
    ended = torch.tensor([bool(a) and a[-1] == end for a in answers], device=device)
    return Samples(answers, tokens, mask, start, answer_mask, logp, entropy, ended)


# ---- rewards --------------------------------------------------------------------------------------------------
RewardFunction = Callable[[list[str], list[str | None]], list[float]]


def reward_function(path: str, key: str) -> RewardFunction:
    """`package.module:function`, imported; `key` names the config key in errors."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise GptlineError(f"{key}={path!r}: cannot import it ({e})") from None


def call_reward(function: RewardFunction, texts: list[str], references: list[str | None], key: str) -> torch.Tensor:
    """The function's scores for `texts`, checked: one finite number per answer."""
    scores = list(function(texts, references))
    if len(scores) != len(texts):
        raise GptlineError(f"{key}: the reward function returned {len(scores)} scores for {len(texts)} answers")
    values = torch.tensor([float(s) for s in scores], dtype=torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise GptlineError(f"{key}: the reward function returned a score that is not a finite number")
    return values


class FrozenModels:
    """The reference model's log-probs and the reward for answers: the models an RL stage never trains. `rm` is the
    reward model's directory (unused with a programmatic `reward`)."""

    def __init__(self, sft: str, rm: str | None, reward: str, normalize: bool, threads: int | None = None,
                 key: str = "reward"):  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        self.key = key
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reference = load(Path(sft)).eval().requires_grad_(False).to(self.device)
        self.template = ChatTemplate(Path(sft))
        self.function = None if reward == "model" else reward_function(reward, key)
        if self.function is None:
            self.reward_model = load(Path(rm)).eval().requires_grad_(False).to(self.device)
            stats = json.loads((Path(rm) / REWARD_STATS).read_text())
            self.mean, self.std = (stats["mean"], max(stats["std"], 1e-6)) if normalize else (0.0, 1.0)

    @torch.no_grad()
    def reference_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor, start: int, temperature: float):
        return forward_logprobs(self.reference, tokens.to(self.device), mask.to(self.device), start, temperature).cpu()

    @torch.no_grad()
    def scores(self, prompts: list[list[int]], answers: list[list[int]], texts: list[str],
               references: list[str | None] | None = None) -> torch.Tensor:  # fmt: skip
        if self.function is not None:
            return call_reward(self.function, texts, references or [None] * len(texts), self.key)
        end, reward = self.template.end_of_turn, self.template.ids["reward"]
        rows = [np.array([*p, *[t for t in a if t != end], end, reward]) for p, a in zip(prompts, answers, strict=True)]
        packed = collate_packed_sequences(rows, self.template.ids["pad"], self.reward_model.cfg.max_seq_len)
        raw = rewards_at_last(self.reward_model, *(torch.from_numpy(a).to(self.device) for a in packed)).cpu()
        return (raw - self.mean) / self.std
