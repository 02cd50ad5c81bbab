"""A LLaMA-style decoder, and nothing else: no parallelism, no optimizer, no DeepSpeed.

Pre-norm RMSNorm blocks; rotary position embeddings (the rotate-half layout of Hugging Face's Llama, so weights
map one to one); multi-head or grouped-query attention through `torch.nn.functional.scaled_dot_product_attention`;
a SwiGLU MLP whose hidden size is (2/3)·4d rounded up to a multiple; optional tied input/output embeddings.
Module names follow `LlamaForCausalLM` (minus its `model.` prefix), so the export is a rename.

`forward(tokens, targets=None, attention_mask=None, cache=None)`: `attention_mask` (B, T) marks real tokens (1)
versus padding (0, e.g. left padding for batched prompts), positions then count real tokens only; `cache` is a
`KVCache` the call appends to (generation); `segments` (B, T) packs several sequences into each row (attention stays
inside a sequence, positions restart per sequence). With `targets` the mean cross-entropy over targets != -100 is
returned beside the logits; `logits_from` computes them from that position on only. `ScalarModel` is the same
decoder with a one-output head instead of `lm_head`: the reward model and PPO's value model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: multi-head attention; fewer than n_heads: grouped-query attention
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size
    hidden_dim: int | None = None  # None: (2/3)·4·dim rounded up to multiple_of
    multiple_of: int = 64
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def validate(self) -> list[tuple[str, str]]:
        if self.dim % self.n_heads:
            return [("dim", f"{self.dim} is not divisible by n_heads={self.n_heads}")]
        if (self.dim // self.n_heads) % 2:
            return [("n_heads", f"head size {self.dim // self.n_heads} must be even for rotary embeddings")]
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            return [("n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")]
        for key in ("dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, key) < 1:
                return [(key, f"must be >= 1, got {getattr(self, key)}")]
        return []

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: the two halves share frequencies
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D) for each token's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # The tables stay fp32 (DeepSpeed's bf16 engine casts parameters, not buffers): the rotation computes with them
    # and rounds once to x's dtype, so q and k keep v's dtype, which attention requires.
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for positions seen so far, preallocated to `max_len`."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, like: torch.Tensor):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(n_layers)]
        self.length = 0
        self.max_len = max_len

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        gqa = self.kv_heads != self.n_heads
        if mask is None:  # training: plain causal attention, the fused path
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, blocks and the final norm: hidden states, which a head turns into logits or scalars."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2·layers) (GPT-2)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=self.cfg.init_std)

    def hidden(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim). With a mask, positions count real tokens only (left padding).
        `segments` (B, T) packs several sequences into a row: a token attends only to earlier tokens of its own
        segment, and positions restart at each segment's first token."""
        b, t = tokens.shape
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        if segments is not None:
            return self._packed(tokens, segments)
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                positions = torch.arange(start, start + t, device=tokens.device).expand(b, t)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        # No padding and queries aligned with keys from the first position: plain causal attention, the fused
        # kernel (transformers makes the same shortcut); otherwise an explicit mask.
        no_padding = attention_mask is None or bool(attention_mask.all())
        mask = None
        if not (no_padding and start == 0):
            mask = self._mask(None if no_padding else attention_mask, b, t, start, tokens.device)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += t
        return self.norm(x)

    def _packed(self, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Packed rows: a block-diagonal causal mask (one block per segment) through SDPA."""
        t = tokens.shape[1]
        index = torch.arange(t, device=tokens.device).expand_as(segments)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        positions = index - torch.where(starts, index, 0).cummax(-1).values
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        mask = (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None, i)
        return self.norm(x)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, b: int, t: int, start: int, device) -> torch.Tensor:
        """Boolean (B, 1, T, start+T): causal, and no attention to padded key positions."""
        keys = start + t
        causal = torch.ones(t, keys, dtype=torch.bool, device=device).tril(diagonal=start)
        mask = causal.expand(b, 1, t, keys)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :keys].bool()
            # A padded query row would attend to nothing (NaN); let it see itself, its output is ignored anyway.
            own = torch.arange(t, device=device)[:, None] + start == torch.arange(keys, device=device)[None, :]
            mask = mask | own
        return mask

    def num_params(self, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.embed_tokens.weight.numel()


class GPT(Decoder):
    """The language model: hidden states through `lm_head` (optionally tied to the embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        logits_from: int = 0,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logits_from`: the first position whose logits (and targets) count; a caller that scores only the end of
        each row (PPO's answers) skips the output projection, the largest matmul of a small model, for the rest."""
        logits = self.lm_head(self.hidden(tokens, attention_mask, cache, positions, segments)[:, logits_from:])
        if targets is None:
            return logits, None
        flat = targets[:, logits_from:].reshape(-1)
        total = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), flat, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        # Mean over real targets; a batch of padding only (the end of an epoch) gives 0, not NaN.
        return logits, total / (flat != IGNORE_INDEX).sum().clamp(min=1)


class ScalarModel(Decoder):
    """A scalar per position from the hidden state through `score` (Hugging Face's
    `LlamaForSequenceClassification` head with one label): the reward model reads it at the reward token, the PPO
    value model at every response position. Built from a language model's weights, minus its `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        self.reset_parameters()
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(cfg.dim + 1))

    @classmethod
    def from_language_model(cls, lm: GPT) -> ScalarModel:
        model = cls(lm.cfg)
        trunk = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
        return model

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) scalars."""
        return self.score(self.hidden(tokens, attention_mask, None, positions, segments)).squeeze(-1).float()


def rewards_at(model: ScalarModel, tokens: torch.Tensor, mask: torch.Tensor, reward_id: int) -> torch.Tensor:
    """Each row's scalar at its last reward token (rows are left- or right-padded; `mask` marks real tokens)."""
    values = model(tokens, attention_mask=mask)
    is_reward = (tokens == reward_id) & mask.bool()
    if not bool(is_reward.any(-1).all()):
        raise ValueError("every row must hold the reward token")
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    index = torch.where(is_reward, positions, -1).amax(-1)
    return values.gather(1, index[:, None]).squeeze(1)


def rewards_at_last(
    model: ScalarModel, tokens: torch.Tensor, segments: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """The scalar at each packed sequence's last token (its reward token): `last` holds (row, position) pairs."""
    values = model(tokens, segments=segments)
    return values[last[:, 0], last[:, 1]]
