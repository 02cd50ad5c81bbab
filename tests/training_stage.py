"""A small real training stage for the fault tests, run by the real runner: numbers ─► fit_numbers.

`fit_numbers` trains a one-layer GPT to predict the next of `numbers`' values (mod its vocabulary) through the
training library, exactly as the recipe's stages do (a recipe, `NextTokenTask`, the worker group, checkpoints in
the work directory's transient part), in seconds rather than minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from gptline.data.formats import load_ragged, save_ragged
from gptline.model.gpt import GPT, ModelConfig
from gptline.training.config import DeepSpeedConfig, TrainConfig, micro_batch
from gptline.training.driver import train
from gptline.training.fit import Schedule
from gptline.training.loaders import ExampleLoader, collate_examples
from gptline.training.supervised import NextTokenTask
from gptline.training.worker import TrainedModel
from pipeline.dag import StageContext, StageResources, StageSpec
from tests.parquet_stages import NumbersConfig, numbers, read_dir

VOCAB, LENGTH = 64, 16


@dataclass
class FitNumbersConfig(TrainConfig):
    steps: int = 6
    batch_size: int = 4
    eval_every: int = 3
    checkpoint_every: int = 3
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass(frozen=True)
class FitNumbersRecipe:
    cfg: FitNumbersConfig
    sequences: str
    micro_batch: int

    def models(self) -> dict[str, TrainedModel]:
        model = GPT(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=VOCAB, max_seq_len=LENGTH, multiple_of=16))
        return {"model": TrainedModel(model, self.cfg.optim, self.micro_batch, self.cfg.grad_accum)}

    def task(self, engines: dict[str, Any], rank: int, world: int) -> NextTokenTask:
        rows = load_ragged(Path(self.sequences), "ids")["ids"]
        examples = [(ids, np.ones(len(ids), bool)) for ids in rows]
        train_rows = ExampleLoader(examples, lambda b: collate_examples(b, 0), self.micro_batch, rank, world, 0)
        validation = ExampleLoader(examples[:8], lambda b: collate_examples(b, 0), self.micro_batch, rank, world, 0,
                                   shuffle=False, require_full_batch=False)  # fmt: skip
        return NextTokenTask("fit_numbers", engines["model"], train_rows, validation, 2, self.cfg.grad_accum,
                             self.cfg.guard, rank)  # fmt: skip

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights["model"].items()}, str(out_dir / "model.safetensors"))


def fit_numbers(cfg: FitNumbersConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict:
    values = read_dir(inputs["numbers"]).column("x").to_numpy() % VOCAB
    rows = [values[i : i + LENGTH] for i in range(0, len(values) - LENGTH + 1, LENGTH)]
    save_ragged(out_dir / "sequences.npz", {"ids": rows})
    recipe = FitNumbersRecipe(
        cfg, str(out_dir / "sequences.npz"), micro_batch("fit_numbers", cfg, ctx.resources.num_workers)
    )
    schedule = Schedule(cfg.steps, cfg.eval_every, 0, cfg.checkpoint_every, cfg.keep_checkpoints)
    return train("fit_numbers", recipe, schedule, cfg.deepspeed, cfg.seed, ctx, out_dir)


REGISTRY = [
    StageSpec("numbers", numbers, NumbersConfig),
    StageSpec(
        "fit_numbers",
        fit_numbers,
        FitNumbersConfig,
        inputs=("numbers",),
        starts_workers=True,
        stops_on_request=True,
        resources=StageResources(num_workers=2, cpus_per_worker=1.0),
    ),
]
