"""sft: supervised fine-tuning of the pretrained model on conversations, with the loss on assistant tokens only.

The stage function reads the conversation files (`data`, "{fetch}" = the fetch artifact; formats in
`gptline/data/chat.py`), encodes each with the chat template, skips and counts records that are bad or longer than
the context, and splits off a held-out set by a hash of each conversation (so the split never depends on order or
on how many files there are). The encoded examples go to `examples.npz` in the artifact (what was trained on, and
what the workers read). Then the training library (`gptline/training`) runs the recipe on the stage's worker group,
as in pretrain: checkpoints, exact resume, the loss guard, warmup + cosine; `epochs` sets the step count unless
`steps` does.

Each example is one row, right-padded to the longest in its micro-batch: with causal attention a row never sees
another example or its own padding, so nothing leaks across examples. Targets are the next tokens where the
template marks them trained (every assistant turn's content and its end-of-turn) and ignored elsewhere: system and
user turns shape the context but are never predicted. Optional LoRA trains low-rank adapters on the chosen layers
and is merged into the weights on export, so the artifact is a plain Llama checkpoint either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptline.data.chat import ChatTemplate, Message, Skipped, read_conversations
from gptline.data.dedup import unit_hash
from gptline.data.formats import EXAMPLES, PROMPTS, load_ragged, save_ragged
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.gpt import GPT
from gptline.model.lora import LoRAConfig, apply_lora, merge_lora
from gptline.training.config import OptimConfig, TrainConfig, epoch_steps, micro_batch
from gptline.training.driver import train
from gptline.training.fit import Schedule
from gptline.training.loaders import ExampleLoader, collate_examples, collate_packed_examples, pack_rows
from gptline.training.log import log_sections
from gptline.training.supervised import NextTokenTask, answer_prompts, generating
from gptline.training.worker import TrainedModel
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError
from pipeline.versioning import unversioned

VERSION = 3
SPLITS = ("train", "validation")


@dataclass
class SFTConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["{fetch}/sft_*/*.jsonl"])  # the fetch stage's chat transcripts
    max_line_bytes: int = MAX_LINE_BYTES  # a longer JSONL line is skipped and counted, never read whole
    validation_fraction: float = 0.1
    steps: int = 0  # 0: set by epochs
    epochs: float = 2.0
    eval_every: int = 50
    sample_every: int = 100
    checkpoint_every: int = 50
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0))
    max_len: int = 0  # tokens per example; 0: the model's context
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    num_samples: int = unversioned(4)  # held-out prompts answered at every sample_every
    # Several conversations share a row (attention kept inside each, positions restarting): the same loss as one
    # padded row per conversation, in fewer rows.
    packing: bool = True

    def validate(self) -> list[tuple[str, str]]:
        problems = (
            super().validate() + at_least(self, 0, "max_len", "num_samples") + at_least(self, 1, "max_line_bytes")
        )
        if not 0 < self.validation_fraction < 1:
            problems.append(("validation_fraction", f"must be in (0, 1), got {self.validation_fraction}"))
        if self.epochs <= 0:
            problems.append(("epochs", f"must be > 0, got {self.epochs}"))
        return problems + ([] if self.data else [("data", "must list at least one file or glob")])


# ---- examples ------------------------------------------------------------------------------------------------
def split_key(messages: list[Message]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def prepare(cfg: SFTConfig, inputs: dict[str, Path], max_len: int) -> tuple[dict[str, list], dict[str, Any], list]:
    """Read, encode, filter and split the conversations; returns the splits, the counts, and held-out prompts."""
    template = ChatTemplate(inputs["tokenizer"])
    patterns = [p.format(**{k: str(v) for k, v in inputs.items()}) for p in cfg.data]
    skipped = Skipped()
    conversations = read_conversations(patterns, "sft.data", skipped, cfg.max_line_bytes)
    kept, keys, prompts = [], [], []
    for number, messages in enumerate(conversations):
        ids, trained = template.encode(messages)
        if len(ids) - 1 > max_len:
            skipped.add("longer_than_context", f"conversation {number} ({len(ids)} tokens > {max_len + 1})")
            continue
        kept.append((ids, trained))
        keys.append(split_key(messages))
        last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last_answer])
    held_out = unit_hash(cfg.seed, "sft-split", keys) < cfg.validation_fraction
    splits = {
        "train": [e for e, h in zip(kept, held_out, strict=True) if not h],
        "validation": [e for e, h in zip(kept, held_out, strict=True) if h],
    }
    if not splits["train"] or not splits["validation"]:
        raise GptlineError(
            f"sft.data: {len(kept)} usable conversations in {patterns} ({sum(skipped.counts.values())} skipped: "
            f"{dict(skipped.counts)}); both the training and the held-out split need at least one"
        )
    counts = {
        "conversations": len(conversations),
        "train_examples": len(splits["train"]),
        "validation_examples": len(splits["validation"]),
        "train_tokens_trained": int(sum(t[1:].sum() for _, t in splits["train"])),
        "skipped": skipped.summary(),
    }
    return splits, counts, [p for p, h in zip(prompts, held_out, strict=True) if h]


def run(cfg: SFTConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    world = ctx.resources.num_workers
    micro = micro_batch("sft", cfg, world)
    base_cfg = json.loads((inputs["pretrain"] / "config.json").read_text())["gptline"]
    context = base_cfg["max_seq_len"]
    if cfg.max_len > context:
        raise GptlineError(f"sft.max_len={cfg.max_len} is longer than the pretrained model's context of {context}")
    splits, counts, held_out_prompts = prepare(cfg, inputs, cfg.max_len or context)
    total_steps = epoch_steps("sft", cfg, len(splits["train"]), "examples")
    save_ragged(out_dir / EXAMPLES, {f"{split}_{column}": [e[i] for e in examples] for split, examples in splits.items()
                                     for i, column in enumerate(("ids", "trained"))})  # fmt: skip
    capacity = cfg.max_len or context
    counts["padding"] = padding_shares([len(ids) - 1 for ids, _ in splits["train"]], micro, world, cfg.seed, capacity)
    (out_dir / "data.json").write_text(json.dumps(counts, indent=2) + "\n")
    lines = (json.dumps({"messages": p}, ensure_ascii=False) + "\n" for p in held_out_prompts)
    (out_dir / PROMPTS).write_text("".join(lines))
    if not ctx.quiet:
        print(f"[sft] {counts['train_examples']} training / {counts['validation_examples']} held-out "
              f"conversations, {total_steps} steps; skipped {dict(skipped_counts(counts))}", flush=True)  # fmt: skip
    recipe = SFTRecipe(cfg, str(inputs["pretrain"]), str(inputs["tokenizer"]), str(out_dir / EXAMPLES), micro,
                       capacity, tuple(held_out_prompts[: cfg.num_samples]))  # fmt: skip
    schedule = Schedule.of(cfg, total_steps)
    final = train("sft", recipe, schedule, cfg.deepspeed, cfg.seed, ctx, out_dir)
    return {
        **final,
        "train_examples": counts["train_examples"],
        "skipped_records": sum(skipped_counts(counts).values()),
    }


def skipped_counts(counts: dict[str, Any]) -> dict[str, int]:
    return {reason: entry["count"] for reason, entry in counts["skipped"].items()}


@dataclass(frozen=True)
class SFTRecipe:
    cfg: SFTConfig
    base: str  # the pretrained model's artifact
    tokenizer: str
    examples: str  # the encoded conversations the stage function wrote for its workers
    micro_batch: int
    row_capacity: int  # tokens per packed row: the longest a conversation may be
    prompts: tuple  # held-out conversations answered in the samples

    def models(self) -> dict[str, TrainedModel]:
        # LoRA's A matrices come from the seeded generator: the same on every rank.
        return {"model": TrainedModel(build_model(Path(self.base), self.cfg.lora), self.cfg.optim, self.micro_batch,
                                      self.cfg.grad_accum)}  # fmt: skip

    def task(self, engines: dict[str, Any], rank: int, world: int) -> SFTTask:
        return SFTTask(self, engines["model"], rank, world)

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        final = build_model(Path(self.base), self.cfg.lora)
        # LoRA's frozen base weights come from the base artifact itself: a bf16 engine holds them rounded to bf16.
        frozen = {name for name, p in final.named_parameters(remove_duplicate=False) if not p.requires_grad}
        trained = {name: weight for name, weight in weights["model"].items() if name not in frozen}
        missing, unexpected = final.load_state_dict(trained, strict=False)
        assert set(missing) == frozen and not unexpected, (missing, unexpected)
        merge_lora(final)
        export(final, out_dir, Path(self.tokenizer), ChatTemplate(Path(self.tokenizer)).ids)


class SFTTask(NextTokenTask):
    """Response-only next-token loss on packed (or padded) conversations; held-out loss; answers to held-out
    prompts."""

    def __init__(self, recipe: SFTRecipe, engine, rank: int, world: int):
        cfg = recipe.cfg
        self.template = ChatTemplate(Path(recipe.tokenizer))
        pad = self.template.ids["pad"]
        examples = load_ragged(Path(recipe.examples), *(f"{s}_{c}" for s in SPLITS for c in ("ids", "trained")))
        train_set, validation_set = (list(zip(examples[f"{s}_ids"], examples[f"{s}_trained"], strict=True))
                                     for s in SPLITS)  # fmt: skip
        micro, capacity = recipe.micro_batch, recipe.row_capacity

        def collate(batch):
            return collate_packed_examples(batch, pad, capacity) if cfg.packing else collate_examples(batch, pad)

        train_rows = ExampleLoader(train_set, collate, micro, rank, world, cfg.seed, what="training conversations")
        validation = ExampleLoader(validation_set, collate, micro, rank, world, cfg.seed, shuffle=False,
                                   require_full_batch=False)  # fmt: skip
        super().__init__("sft", engine, train_rows, validation, cfg.eval_batches, cfg.grad_accum, cfg.guard, rank)
        self.cfg, self.prompts = cfg, list(recipe.prompts)

    def samples(self) -> list[str]:
        with generating(self.engine.module) as model:
            return answer_prompts(model, self.template, self.prompts, self.cfg.sample_tokens, self.cfg.seed)


def build_model(base: Path, lora: LoRAConfig) -> GPT:
    model = load(base)
    if lora.rank:
        apply_lora(model, lora)
    return model


def padding_shares(lengths: list[int], micro: int, world: int, seed: int, capacity: int) -> dict[str, float]:
    """The share of padding in the first epoch's micro-batches, with one padded row per conversation and packed:
    the compute spent on no token at all."""
    real = padded = packed = 0
    for rank in range(world):
        order = ExampleLoader(list(range(len(lengths))), list, micro, rank, world, seed)
        for batch in order.epoch_batches():
            present = [lengths[i] for i in batch if i is not None]
            real += sum(present)
            padded += len(batch) * max(present, default=1)
            rows = pack_rows([(np.zeros(n),) for n in present] or [(np.zeros(1),)], capacity, (0,))
            packed += rows.segments.size
    return {"padded": 1 - real / padded, "packed": 1 - real / packed}


def report(directory: Path) -> list[dict[str, Any]]:
    """Loss on assistant tokens (training and held out), learning rate, the share of padding, and the last
    answers."""
    sections = log_sections(directory, [("loss (assistant tokens)", ("loss", "val_loss")), ("learning rate", ("lr",))])
    shares = json.loads((directory / "data.json").read_text()).get("padding")
    if shares:
        rows = [[layout, f"{share:.1%}"] for layout, share in shares.items()]
        sections.append({"kind": "table", "title": "padding in the training batches (first epoch)",
                         "columns": ["rows", "padding"], "rows": rows})  # fmt: skip
    return sections
