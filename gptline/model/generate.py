"""Batched sampling with a KV cache: temperature, top-k, top-p, max new tokens, stop tokens, left padding.

Prompts of different lengths are left-padded into one batch; an attention mask keeps padding invisible and
positions count real tokens only, so a padded prompt generates exactly what it would alone. The prompt is run once
(prefill) and each new token costs one position of attention against the cache. `use_cache=False` recomputes the
whole sequence every step (the reference the cache is checked against, and the benchmark's baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptline.model.gpt import GPT, KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def validate(self) -> list[tuple[str, str]]:
        if self.max_new_tokens < 1:
            return [("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")]
        if self.temperature < 0:
            return [("temperature", f"must be >= 0, got {self.temperature}")]
        if not 0 < self.top_p <= 1:
            return [("top_p", f"must be in (0, 1], got {self.top_p}")]
        return [] if self.top_k >= 0 else [("top_k", f"must be >= 0, got {self.top_k}")]


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, V) logits."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = temperature_scaled(logits, cfg.temperature)
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return inverse_cdf_sample(logits.softmax(-1), generator)


def temperature_scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits divided by `temperature`; left as they are at 1 (a pass over the vocabulary, and its backward in
    PPO's updates, for nothing) and at 0 (greedy: no distribution to sharpen)."""
    logits = logits.float()
    return logits / temperature if temperature not in (0, 1) else logits


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of (B, V) probabilities from one uniform draw per row: the first index whose cumulative
    mass exceeds it. `torch.multinomial` draws an exponential variate per vocabulary entry (V random numbers per
    row, about 5x slower at V=2048 and the bulk of a small model's decoding step). The draw is scaled by the row's
    total so rounding in the cumulative sum can never land on a zero-probability (top-k/top-p masked) entry."""
    cumulative = probs.cumsum(-1)
    # Drawn where the generator lives (a seeded CPU generator gives the same answers on a GPU), then moved.
    uniform = torch.rand(probs.shape[0], 1, generator=generator, device=generator.device if generator else None)
    draw = uniform.to(probs.device) * cumulative[:, -1:]
    return (cumulative <= draw).sum(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (a stop token, when one is sampled, is the last token of its row)."""
    device = model.lm_head.weight.device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    if width + cfg.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt of {width} tokens + {cfg.max_new_tokens} new exceeds max_seq_len={model.cfg.max_seq_len}"
        )
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    cache = KVCache(len(model.layers), len(prompts), model.cfg.kv_heads, width + cfg.max_new_tokens,
                    model.cfg.head_dim, model.lm_head.weight) if use_cache else None  # fmt: skip
    logits, _ = model(tokens, attention_mask=mask, cache=cache, positions=positions)
    for _ in range(cfg.max_new_tokens):
        next_token = sample_next(logits[:, -1], cfg, generator)
        next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
        out.append(next_token)
        if on_step is not None:  # streaming output; PPO takes the sampling log-probs from these logits
            on_step(next_token, logits[:, -1])
        done = done | torch.isin(next_token, stops)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(next_token)[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        if use_cache:
            logits, _ = model(next_token[:, None], attention_mask=mask, cache=cache, positions=positions)
        else:
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            all_positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, _ = model(tokens, attention_mask=mask, positions=all_positions)
    generated = torch.stack(out, dim=1).tolist()
    results = []
    for row in generated:
        kept = []
        for token in row:
            kept.append(token)
            if token in stop_ids:
                break
        results.append(kept)
    return results
