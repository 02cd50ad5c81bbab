"""rm: a reward model trained on human comparisons: the SFT model's trunk plus a scalar head read at the reward token.

The stage function reads the comparison files (`data`; pairs, K-way rankings and Anthropic HH transcripts, see
`gptline/data/chat.py`), encodes each side as prompt + response + `<|reward|>` with the chat template, skips and
counts comparisons longer than the context, and holds out a fraction by a hash of the prompt (every pair of one
prompt stays on one side). The encoded pairs go to `comparisons.npz`; the training library runs the recipe on the
stage's workers with checkpoints, exact resume and the loss guard, as for every training stage.

Loss: -log sigmoid(r_chosen - r_rejected), each pair weighted (1/C(K,2) for the pairs of a K-way ranking, 1 for a plain
pair), averaged over the micro-batch's weight. Both sides of a micro-batch run as one right-padded batch; the scalar
is read at each row's reward token (`rewards_at` finds it, under left or right padding alike). Held-out accuracy
(the chosen side scores higher), mean margin and loss are logged; at the end the held-out rewards' mean and
standard deviation go to `reward_stats.json` for PPO's normalization. The model exports as
`LlamaForSequenceClassification`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptline.data.chat import ChatTemplate, Comparison, Skipped, read_comparisons, split_comparisons
from gptline.data.formats import COMPARISONS, REWARD_STATS, load_ragged, save_ragged
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.gpt import ScalarModel, rewards_at, rewards_at_last
from gptline.training.collectives import all_reduce_sum
from gptline.training.config import OptimConfig, TrainConfig, epoch_steps, micro_batch
from gptline.training.driver import train
from gptline.training.fit import Schedule
from gptline.training.loaders import ExampleLoader, collate_packed_sequences, pad_rows
from gptline.training.log import log_sections
from gptline.training.preference import weighted_mean
from gptline.training.supervised import SupervisedTask, to_device
from gptline.training.worker import TrainedModel
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 3
SPLITS = ("train", "validation")
COLUMNS = ("chosen", "rejected", "weight")


@dataclass
class RMConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["{fetch}/preferences_*/*.jsonl"])  # the fetch stage's pairs
    max_line_bytes: int = MAX_LINE_BYTES  # a longer JSONL line is skipped and counted, never read whole
    validation_fraction: float = 0.1
    steps: int = 0  # 0: set by epochs
    epochs: float = 1.0  # InstructGPT: one epoch; more overfits
    max_len: int = 0  # tokens per side; 0: the model's context
    packing: bool = True  # several sequences per row (see sft.packing): the same rewards in fewer rows
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0))

    def validate(self) -> list[tuple[str, str]]:
        problems = super().validate() + at_least(self, 0, "max_len") + at_least(self, 1, "max_line_bytes")
        if not 0 < self.validation_fraction < 1:
            problems.append(("validation_fraction", f"must be in (0, 1), got {self.validation_fraction}"))
        if self.epochs <= 0:
            problems.append(("epochs", f"must be > 0, got {self.epochs}"))
        return problems + ([] if self.data else [("data", "must list at least one file or glob")])


# ---- the objective -------------------------------------------------------------------------------------------
def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(w * -log sigmoid(r_chosen - r_rejected)) / sum(w); zero when the batch holds no pair."""
    return weighted_mean(-F.logsigmoid(chosen - rejected), weight)


def collate(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None], pad_id: int, reward_id: int,
            capacity: int | None):  # fmt: skip
    """Chosen sequences then rejected ones and each pair's weight: right-padded rows (tokens, mask, weight), or
    with a `capacity` packed rows (tokens, segments, last, weight); an empty slot is a zero-weight pair of reward
    tokens."""
    empty = (np.array([reward_id]), np.array([reward_id]), np.array([0.0]))
    pairs = [p if p is not None else empty for p in pairs]
    sequences = [p[0] for p in pairs] + [p[1] for p in pairs]
    weight = np.array([float(p[2][0]) for p in pairs])
    if capacity is None:
        return (*pad_rows(sequences, pad_id), weight)
    return (*collate_packed_sequences(sequences, pad_id, capacity), weight)


# ---- data ------------------------------------------------------------------------------------------------------
def prepare(cfg: RMConfig, inputs: dict[str, Path], template: ChatTemplate, max_len: int):
    patterns = [p.format(**{k: str(v) for k, v in inputs.items()}) for p in cfg.data]
    skipped = Skipped()
    comparisons = read_comparisons(patterns, "rm.data", skipped, cfg.max_line_bytes)

    def encode(number: int, c: Comparison):
        chosen, rejected = template.reward_input(c.prompt, c.chosen), template.reward_input(c.prompt, c.rejected)
        if max(len(chosen), len(rejected)) > max_len:
            skipped.add("longer_than_context", f"comparison {number} ({max(len(chosen), len(rejected))} > {max_len})")
            return None
        return chosen, rejected, np.array([c.weight])

    splits = split_comparisons(comparisons, encode, cfg.seed, cfg.validation_fraction, f"rm.data {patterns}", skipped)
    counts = {"comparisons": len(comparisons), "train_pairs": len(splits["train"]),
              "validation_pairs": len(splits["validation"]), "skipped": skipped.summary()}  # fmt: skip
    return splits, counts


def run(cfg: RMConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    micro = micro_batch("rm", cfg, ctx.resources.num_workers)
    context = json.loads((inputs["sft"] / "config.json").read_text())["gptline"]["max_seq_len"]
    if cfg.max_len > context:
        raise GptlineError(f"rm.max_len={cfg.max_len} is longer than the SFT model's context of {context}")
    splits, counts = prepare(cfg, inputs, ChatTemplate(inputs["sft"]), cfg.max_len or context)
    total_steps = epoch_steps("rm", cfg, len(splits["train"]), "pairs")
    save_ragged(out_dir / COMPARISONS, {f"{split}_{column}": [p[i] for p in pairs] for split, pairs in splits.items()
                                        for i, column in enumerate(COLUMNS)})  # fmt: skip
    (out_dir / "data.json").write_text(json.dumps(counts, indent=2) + "\n")
    skipped = {reason: entry["count"] for reason, entry in counts["skipped"].items()}
    if not ctx.quiet:
        print(f"[rm] {counts['train_pairs']} training / {counts['validation_pairs']} held-out pairs, "
              f"{total_steps} steps; skipped {skipped}", flush=True)  # fmt: skip
    recipe = RMRecipe(cfg, str(inputs["sft"]), str(out_dir / COMPARISONS), micro, cfg.max_len or context)
    schedule = Schedule.of(cfg, total_steps)
    final = train("rm", recipe, schedule, cfg.deepspeed, cfg.seed, ctx, out_dir)
    stats = {"mean": final["reward_mean"], "std": final["reward_std"], "pairs": counts["validation_pairs"]}
    (out_dir / REWARD_STATS).write_text(json.dumps(stats, indent=2) + "\n")
    return {**final, "train_pairs": counts["train_pairs"], "skipped_records": sum(skipped.values())}


@dataclass(frozen=True)
class RMRecipe:
    cfg: RMConfig
    sft: str  # the SFT model's artifact: the trunk, the tokenizer and the chat template
    comparisons: str  # the encoded pairs the stage function wrote for its workers
    micro_batch: int
    row_capacity: int  # tokens per packed row: the longest a side may be

    def models(self) -> dict[str, TrainedModel]:
        # The head's initial weights come from the seeded generator: the same on every rank.
        model = ScalarModel.from_language_model(load(Path(self.sft)))
        return {"model": TrainedModel(model, self.cfg.optim, self.micro_batch, self.cfg.grad_accum)}

    def task(self, engines: dict[str, Any], rank: int, world: int) -> RMTask:
        return RMTask(self, engines["model"], rank, world)

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        final = ScalarModel(load(Path(self.sft)).cfg)
        final.load_state_dict(weights["model"])
        export(final, out_dir, Path(self.sft), ChatTemplate(Path(self.sft)).ids)


class RMTask(SupervisedTask):
    def __init__(self, recipe: RMRecipe, engine, rank: int, world: int):
        cfg = recipe.cfg
        self.template = ChatTemplate(Path(recipe.sft))
        pad, self.reward_id = self.template.ids["pad"], self.template.ids["reward"]
        names = [f"{s}_{c}" for s in SPLITS for c in COLUMNS]
        columns = load_ragged(Path(recipe.comparisons), *names)
        train_set, validation_set = (list(zip(*(columns[f"{s}_{c}"] for c in COLUMNS), strict=True)) for s in SPLITS)

        def batch(pairs):
            return collate(pairs, pad, self.reward_id, recipe.row_capacity if cfg.packing else None)

        micro = recipe.micro_batch
        train_pairs = ExampleLoader(train_set, batch, micro, rank, world, cfg.seed, what="training pairs")
        self.validation = ExampleLoader(validation_set, batch, micro, rank, world, cfg.seed, shuffle=False,
                                        require_full_batch=False)  # fmt: skip
        super().__init__("rm", engine, train_pairs, cfg.grad_accum, cfg.guard, rank)

    def rewards(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        *rows, weight = to_device(batch, self.engine.device)
        if len(rows) == 3:  # packed
            rewards = rewards_at_last(self.engine, *rows)
        else:
            rewards = rewards_at(self.engine, *rows, self.reward_id)
        half = len(weight)
        return rewards[:half], rewards[half:], weight.float()

    def loss(self, batch) -> torch.Tensor:
        return pairwise_loss(*self.rewards(batch))

    def tokens(self, batch) -> int:
        return int((batch[1] > 0).sum())  # the mask, or the segments (0: padding)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Over the whole held-out split: loss, accuracy, margin, and the reward distribution PPO normalizes by."""
        self.validation.rewind()
        self.engine.eval()
        # pairs, correct, margin sum, weighted loss sum, weight sum, reward sum, reward sum of squares
        total = torch.zeros(7, dtype=torch.float64)
        for batch in self.validation.epoch_batches():
            chosen, rejected, weight = self.rewards(batch)
            real = weight > 0
            chosen, rejected, w = chosen[real].double(), rejected[real].double(), weight[real].double()
            both = torch.cat([chosen, rejected])
            total += torch.stack([real.sum().double(), (chosen > rejected).sum().double(), (chosen - rejected).sum(),
                                  (w * -F.logsigmoid(chosen - rejected)).sum(), w.sum(), both.sum(),
                                  (both**2).sum()])  # fmt: skip
        self.engine.train()
        pairs, correct, margin, loss, weight, reward_sum, reward_sq = all_reduce_sum(total).tolist()
        mean = reward_sum / max(1.0, 2 * pairs)
        return {"val_loss": loss / max(weight, 1e-12), "val_accuracy": correct / max(1.0, pairs),
                "val_margin": margin / max(1.0, pairs), "reward_mean": mean,
                "reward_std": math.sqrt(max(0.0, reward_sq / max(1.0, 2 * pairs) - mean**2))}  # fmt: skip


def report(directory: Path) -> list[dict[str, Any]]:
    """Pairwise loss, held-out accuracy and margin."""
    return log_sections(directory, [("pairwise loss", ("loss", "val_loss")), ("held-out accuracy", ("val_accuracy",)),
                                    ("held-out margin", ("val_margin",))])  # fmt: skip
