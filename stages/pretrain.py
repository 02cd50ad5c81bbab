"""pretrain: the LLaMA-style model trained on the token shards with DeepSpeed ZeRO, on the stage's worker group.

The stage function checks its inputs (token ids inside the tokenizer's vocabulary, the context within the model's,
enough rows for the global batch) before any worker starts. The global batch is config (identity); the micro batch
per worker follows from the world size and the accumulation steps, so a run on 1 worker and on 8 sees the same rows
at every optimizer step.

What is pretraining's own is here (`PretrainRecipe`): the model (the same seeded initialisation on every rank,
optionally with activation checkpointing or compiled blocks), next-token loss on packed rows from the token shards,
validation loss on the held-out shards, samples from `sample_prompts`, MFU (6N plus the attention term, against the
configured peak or, on CPU, the measured fp32 matmul peak), and the export: consolidated fp32 weights
(`model.safetensors`) with a Hugging Face config and tokenizer beside them. The training library does the rest
(`gptline/training`: the worker, checkpoints with exact resume, the loss guard, the log). With a "base_model" input
(an imported model, `base_model.continue_pretraining=true`) training continues from its weights, with its shape
instead of `pretrain.model`'s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gptline.data.tokenizer import load_tokenizer
from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig, generate
from gptline.model.gpt import GPT, ModelConfig
from gptline.training.config import OptimConfig, TrainConfig, micro_batch
from gptline.training.driver import train
from gptline.training.engine import checkpoint_blocks, compile_blocks, flops_per_token, measured_peak_flops
from gptline.training.fit import Schedule
from gptline.training.loaders import PackedLoader, TokenStream
from gptline.training.log import log_sections
from gptline.training.supervised import NextTokenTask, generating
from gptline.training.worker import TrainedModel, worker_threads
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError
from pipeline.versioning import unversioned

VERSION = 2


@dataclass
class PretrainConfig(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=30))
    seq_len: int = 0  # 0: the model's max_seq_len
    sample_prompts: list[str] = unversioned(default_factory=lambda: ["The history of", "def main():", "Q: What is"])
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (gptline/training/engine.py: compile_blocks)
    peak_flops: float = unversioned(0.0)  # per worker, for MFU; 0: measure the fp32 matmul peak (CPU)

    def validate(self) -> list[tuple[str, str]]:
        return super().validate() + at_least(self, 1, "steps") + at_least(self, 0, "seq_len")


def _check_inputs(cfg: PretrainConfig, tokens: Path, tokenizer: Path, world: int) -> tuple[dict, int, int]:
    """Everything that can be wrong with the inputs, found before any worker starts."""
    meta = json.loads((tokenizer / "tokenizer_meta.json").read_text())
    vocab = meta["vocab_size"]
    if cfg.model.vocab_size not in (0, vocab):
        raise GptlineError(f"pretrain.model.vocab_size={cfg.model.vocab_size} but the tokenizer has {vocab} pieces")
    stream = TokenStream(tokens / "train")
    largest = stream.max_token()
    if largest >= vocab:
        raise GptlineError(
            f"{tokens / 'train'}: token id {largest} is outside the tokenizer's vocabulary of {vocab}: the shards "
            "were not made with this tokenizer"
        )
    seq_len = cfg.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise GptlineError(
            f"pretrain.seq_len={seq_len} is longer than pretrain.model.max_seq_len={cfg.model.max_seq_len}"
        )
    micro = micro_batch("pretrain", cfg, world)
    PackedLoader(stream, micro, seq_len, world_size=world)  # raises when the data cannot feed a global batch
    return meta, seq_len, micro


def run(cfg: PretrainConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    workers = ctx.resources.num_workers
    base = inputs.get("base_model")
    if base is not None:  # continued pretraining: the imported model's shape
        cfg = replace(cfg, model=ModelConfig(**json.loads((base / "config.json").read_text())["gptline"]))
    meta, seq_len, micro = _check_inputs(cfg, inputs["tokenize"], inputs["tokenizer"], workers)
    recipe = PretrainRecipe(cfg, meta["vocab_size"], meta["special_ids"], str(inputs["tokenize"]),
                            str(inputs["tokenizer"]), str(base or ""), seq_len, micro)  # fmt: skip
    # per worker, measured here while the cores are idle (inside a busy worker it would read low)
    peak = cfg.peak_flops or measured_peak_flops(worker_threads(ctx.resources.threads_per_worker, workers))
    schedule = Schedule.of(cfg, cfg.steps)
    return train("pretrain", recipe, schedule, cfg.deepspeed, cfg.seed, ctx, out_dir, peak)


@dataclass(frozen=True)
class PretrainRecipe:
    cfg: PretrainConfig
    vocab_size: int
    special_ids: dict[str, int]
    tokens: str
    tokenizer: str
    base: str  # an imported model to continue from; "" for a fresh one
    seq_len: int
    micro_batch: int

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{**asdict(self.cfg.model), "vocab_size": self.vocab_size})

    def models(self) -> dict[str, TrainedModel]:
        model = load(Path(self.base)) if self.base else GPT(self.model_config())
        if self.cfg.activation_checkpointing:
            checkpoint_blocks(model)
        if self.cfg.compile:
            compile_blocks(model)
        return {"model": TrainedModel(model, self.cfg.optim, self.micro_batch, self.cfg.grad_accum)}

    def task(self, engines: dict[str, Any], rank: int, world: int) -> PretrainTask:
        return PretrainTask(self, engines["model"], rank, world)

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        final = GPT(self.model_config())
        final.load_state_dict(weights["model"])
        export(final, out_dir, Path(self.tokenizer), self.special_ids)


class PretrainTask(NextTokenTask):
    """Next-token prediction on packed rows; validation loss on the held-out shards; samples from prompts."""

    def __init__(self, recipe: PretrainRecipe, engine, rank: int, world: int):
        cfg, pad = recipe.cfg, recipe.special_ids["pad"]
        tokens, seq_len, micro = Path(recipe.tokens), recipe.seq_len, recipe.micro_batch
        train_rows = PackedLoader(TokenStream(tokens / "train"), micro, seq_len, rank, world, cfg.seed, pad)
        # Built once: each evaluation rewinds it to the same first batches.
        validation = PackedLoader(TokenStream(tokens / "validation"), micro, seq_len, rank, world, cfg.seed, pad,
                                  shuffle=False, require_full_batch=False)  # fmt: skip
        super().__init__("pretrain", engine, train_rows, validation, cfg.eval_batches, cfg.grad_accum, cfg.guard, rank)
        self.cfg, self.end_of_text, self.pad = cfg, recipe.special_ids["end_of_text"], pad
        self.flops_per_token = flops_per_token(engine.module, seq_len)
        self.tokenizer = load_tokenizer(Path(recipe.tokenizer))

    def samples(self) -> list[str]:
        prompts = [self.tokenizer.encode(p) for p in self.cfg.sample_prompts]
        sampling = SamplingConfig(max_new_tokens=self.cfg.sample_tokens, temperature=0.8, top_k=40)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        with generating(self.engine.module) as model:
            completions = generate(model, prompts, sampling, stop_ids=[self.end_of_text], pad_id=self.pad,
                                   generator=generator)  # fmt: skip
        return [p + self.tokenizer.decode(c) for p, c in zip(self.cfg.sample_prompts, completions, strict=True)]


def report(directory: Path) -> list[dict[str, Any]]:
    """Loss curves, learning rate, throughput and MFU, and the last samples (for the run report)."""
    return log_sections(directory, [("loss", ("loss", "val_loss")), ("learning rate", ("lr",)),
                                    ("tokens/s", ("tokens_per_s",)), ("MFU", ("mfu",))])  # fmt: skip
