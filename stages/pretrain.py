"""pretrain: the LLaMA-style model trained on the token shards with DeepSpeed ZeRO, on a Ray Train worker group.

The stage function checks its inputs (token ids inside the tokenizer's vocabulary, the context within the model's,
enough rows for the global batch) and then launches `num_workers` workers (`gptline/training/loop.py`: gloo on CPU,
nccl on GPU); every worker runs `train_loop`: the same seeded initialisation, a DeepSpeed engine (ZeRO stage,
offload and precision from config), and the packed loader's slice for its rank. The global batch is config
(identity); the micro batch per worker follows from the world size and the accumulation steps, so a run on 1
worker and on 8 sees the same rows at every optimizer step.

The shared loop does the rest: checkpoints with exact resume, the loss guard, the log. What is pretraining's own is
here: next-token loss on packed rows, validation loss on the held-out shards, samples from `sample_prompts`, and
MFU (6N plus the attention term, against the configured peak or, on CPU, the measured fp32 matmul peak). At the end
rank 0 writes consolidated fp32 weights (`model.safetensors`, also under ZeRO-3) with a Hugging Face export beside
them. With a "base_model" input (an imported model, `base_model.continue_pretraining=true`) training continues
from its weights, with its shape instead of `pretrain.model`'s.
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
from gptline.model.gpt import GPT, IGNORE_INDEX, ModelConfig
from gptline.training.engine import Checkpoints, compile_blocks, flops_per_token, init_deepspeed, measured_peak_flops
from gptline.training.loaders import PackedLoader, TokenStream
from gptline.training.loop import (
    CHECKPOINTS,
    TrainConfig,
    barrier,
    consolidated_state,
    fit,
    launch,
    log_sections,
    micro_batch,
    worker_context,
)
from pipeline.checks import at_least
from pipeline.config import typed
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 1


@dataclass
class PretrainConfig(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    seq_len: int = 0  # 0: the model's max_seq_len
    sample_prompts: list[str] = field(default_factory=lambda: ["The history of", "def main():", "Q: What is"])
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (gptline/training/engine.py: compile_blocks)
    peak_flops: float = 0.0  # per worker, for MFU; 0: measure the fp32 matmul peak (CPU)

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
    base = inputs.get("base_model")
    if base is not None:  # continued pretraining: the imported model's shape
        cfg = replace(cfg, model=ModelConfig(**json.loads((base / "config.json").read_text())["gptline"]))
    meta, seq_len, micro = _check_inputs(cfg, inputs["tokenize"], inputs["tokenizer"], ctx.resources.num_workers)
    loop_config = {
        "config": asdict(cfg),
        "vocab_size": meta["vocab_size"],
        "special_ids": meta["special_ids"],
        "tokens": str(inputs["tokenize"]),
        "tokenizer": str(inputs["tokenizer"]),
        "base": str(base or ""),
        "seq_len": seq_len,
        "micro_batch": micro,
        # per worker, measured here while the cores are idle (inside a busy worker it would read low)
        "peak_flops": cfg.peak_flops or measured_peak_flops(max(1, int(ctx.resources.cpus_per_worker))),
    }
    return launch("pretrain", train_loop, loop_config, ctx, out_dir)


class PretrainTask:
    """Next-token prediction on packed rows; validation loss on the held-out shards; samples from prompts."""

    def __init__(self, cfg: PretrainConfig, loop: dict[str, Any], rank: int, world: int):
        self.cfg, self.special = cfg, loop["special_ids"]
        tokens, seq_len, micro = Path(loop["tokens"]), loop["seq_len"], loop["micro_batch"]
        self.train = PackedLoader(TokenStream(tokens / "train"), micro, seq_len, rank, world, cfg.seed,
                                  self.special["pad"])  # fmt: skip
        # Built once: each evaluation rewinds it to the same first batches.
        self.validation = PackedLoader(TokenStream(tokens / "validation"), micro, seq_len, rank, world, cfg.seed,
                                       self.special["pad"], shuffle=False, require_full_batch=False)  # fmt: skip
        self.sp = load_tokenizer(Path(loop["tokenizer"]))

    def loss(self, engine, batch) -> torch.Tensor:
        inputs, targets = batch
        return engine(torch.from_numpy(inputs).to(engine.device), torch.from_numpy(targets).to(engine.device))[1]

    def tokens(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        self.validation.rewind()
        engine.eval()
        total = torch.zeros(2)
        for _, batch in zip(range(self.cfg.eval_batches), self.validation.epoch_batches(), strict=False):
            valid = float(self.tokens(batch))
            total += torch.tensor([float(self.loss(engine, batch)) * valid, valid])
        engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        return {"val_loss": float(total[0] / total[1].clamp(min=1))}

    def samples(self, model: GPT) -> list[str]:
        prompts = [self.sp.encode(p) for p in self.cfg.sample_prompts]
        sampling = SamplingConfig(max_new_tokens=self.cfg.sample_tokens, temperature=0.8, top_k=40)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        completions = generate(model, prompts, sampling, stop_ids=[self.special["end_of_text"]],
                               pad_id=self.special["pad"], generator=generator)  # fmt: skip
        return [p + self.sp.decode(c) for p, c in zip(self.cfg.sample_prompts, completions, strict=True)]


def train_loop(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the model, its DeepSpeed engine, the shared loop; rank 0 writes the weights."""
    rank, world = worker_context()
    torch.set_num_threads(loop["threads"])
    cfg: PretrainConfig = typed(PretrainConfig, loop["config"])
    model_cfg = ModelConfig(**{**asdict(cfg.model), "vocab_size": loop["vocab_size"]})
    out_dir, seq_len = Path(loop["out_dir"]), loop["seq_len"]
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = load(Path(loop["base"])) if loop["base"] else GPT(model_cfg)
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    if cfg.compile:
        compile_blocks(model)
    engine, optimizer = init_deepspeed(model, cfg.optim, cfg.deepspeed, loop["micro_batch"], cfg.grad_accum)
    task = PretrainTask(cfg, loop, rank, world)
    peak, flops_token = loop["peak_flops"], flops_per_token(model, seq_len)

    def mfu(seconds: float, tokens: int) -> dict[str, float]:
        return {"mfu": tokens * flops_token / seconds / (peak * world)}

    fit(
        "pretrain", task, engine, optimizer, cfg, cfg.steps, out_dir, rank, world, loop["progress"], mfu, loop["mirror"]
    )
    state = consolidated_state(engine, cfg.deepspeed, Checkpoints(out_dir / CHECKPOINTS, 1, loop["mirror"]), rank)
    if rank == 0:
        final = GPT(model_cfg)
        final.load_state_dict(state)
        export(final, out_dir, Path(loop["tokenizer"]), loop["special_ids"])
    barrier()


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing around each block (wrapped here, so the model file stays plain)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def report(directory: Path) -> list[dict[str, Any]]:
    """Loss curves, learning rate, throughput and MFU, and the last samples (for the run report)."""
    return log_sections(directory, [("loss", ("loss", "val_loss")), ("learning rate", ("lr",)),
                                    ("tokens/s", ("tokens_per_s",)), ("MFU", ("mfu",))])  # fmt: skip
