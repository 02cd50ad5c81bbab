"""dpo: direct preference optimization of the SFT model on the comparisons rm reads, with no reward model and no
sampling.

The stage function reads the comparison files (`data`: pairs, K-way rankings expanded to all C(K,2) pairs weighted
1/C(K,2), Anthropic HH transcripts; read and split exactly as rm does, by `gptline/data/chat.py`, so at the same
seed and fraction both hold out the same prompts), and encodes each answer as the conversation ending in it: the
tokens trained are the last answer's and its end-of-turn. Bad input stops it before any training, naming the file
and record: a pair whose chosen and rejected texts are the same (nothing to learn, a data bug), and a prompt that
leaves no room for an answer in the context. A pair longer than the context is skipped and counted, as rm does.

Training runs on the stage's workers through the training library (checkpoints, exact resume, the loss guard). A
micro-batch's chosen and rejected sequences are packed into rows together (attention kept inside each), and each
answer's log-probability is the sum over its tokens. The loss (`loss.kind`: DPO's sigmoid with optional label
smoothing, IPO, SimPO) is in `gptline/training/preference.py`. The reference model's log-probabilities of the
training answers are computed once, before the first step, by the workers together, and stored in the work
directory (`reference_logps.npz`), so a resumed or restarted group reads them instead (SimPO has no reference).

Held out, at every `eval_every`: the loss, the implicit-reward accuracy (the chosen answer's reward the higher; a
tie counts half) and mean margin, the chosen and rejected answers' mean log-probabilities, and the KL divergence
to the reference per answer token (the full next-token distributions, a frozen copy of the SFT model beside the
trained one). Samples answer held-out prompts. The export is a chat model like sft's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptline.data.chat import ChatTemplate, Comparison, Message, Skipped, read_comparisons, split_comparisons
from gptline.data.formats import load_ragged, save_ragged
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.gpt import IGNORE_INDEX
from gptline.training.collectives import all_reduce_sum, barrier
from gptline.training.config import OptimConfig, TrainConfig, epoch_steps, micro_batch
from gptline.training.driver import train
from gptline.training.fit import Schedule
from gptline.training.loaders import ExampleLoader, pack_rows, training_row
from gptline.training.log import log_sections
from gptline.training.preference import PairLogProbs, PreferenceLossConfig, preference_losses, weighted_mean
from gptline.training.supervised import SupervisedTask, answer_prompts, generating, to_device
from gptline.training.worker import TrainedModel
from pipeline.checks import at_least
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 1
SPLITS = ("train", "validation")
COLUMNS = ("chosen", "chosen_trained", "rejected", "rejected_trained", "weight")
PAIRS = "pairs.npz"  # the encoded pairs: {split}_{column}
REFERENCE = "reference_logps.npz"  # the reference's summed log-probabilities of the training answers


@dataclass
class DPOConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["{fetch}/preferences_*/*.jsonl"])
    max_line_bytes: int = MAX_LINE_BYTES  # a longer JSONL line is skipped and counted, never read whole
    validation_fraction: float = 0.1
    steps: int = 0  # 0: set by epochs
    epochs: float = 1.0
    max_len: int = 0  # tokens per sequence (prompt and answer); 0: the model's context
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    num_samples: int = 4  # held-out prompts answered at every sample_every
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0))

    def validate(self) -> list[tuple[str, str]]:
        problems = (
            super().validate() + at_least(self, 0, "max_len", "num_samples") + at_least(self, 1, "max_line_bytes")
        )
        problems += [(f"loss.{key}", message) for key, message in self.loss.validate()]
        if not 0 < self.validation_fraction < 1:
            problems.append(("validation_fraction", f"must be in (0, 1), got {self.validation_fraction}"))
        if self.epochs <= 0:
            problems.append(("epochs", f"must be > 0, got {self.epochs}"))
        return problems + ([] if self.data else [("data", "must list at least one file or glob")])


# ---- data ------------------------------------------------------------------------------------------------------
def answer_encoding(template: ChatTemplate, prompt: list[Message], prompt_ids: list[int], answer: str,
                    source: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The conversation ending in `answer` and a mask of the tokens trained: the answer's and its end-of-turn only
    (earlier assistant turns of the prompt are context here)."""
    ids, trained = template.encode([*prompt, {"role": "assistant", "content": answer}])
    if ids[: len(prompt_ids)].tolist() != prompt_ids:
        raise GptlineError(f"{source}: the chat template does not render the prompt as a prefix of the prompt and "
                           "its answer; the answer's tokens cannot be found")  # fmt: skip
    trained[: len(prompt_ids)] = False
    return ids, trained


def prepare(cfg: DPOConfig, inputs: dict[str, Path], template: ChatTemplate, max_len: int):
    """Read, check, encode and split the comparisons: (splits, counts, held-out prompts)."""
    patterns = [p.format(**{k: str(v) for k, v in inputs.items()}) for p in cfg.data]
    skipped = Skipped()
    comparisons = read_comparisons(patterns, "dpo.data", skipped, cfg.max_line_bytes)
    for c in comparisons:
        if c.chosen == c.rejected:
            raise GptlineError(f"dpo.data: {c.source}: the chosen and the rejected answer are the same text "
                               f"({c.chosen[:60]!r}); a preference between them teaches nothing")  # fmt: skip
    prompts: dict[str, list[int]] = {}

    def encode(number: int, c: Comparison):
        key = json.dumps(c.prompt, sort_keys=True)
        if key not in prompts:  # the pairs of one question share their prompt: encoded once
            prompts[key] = template.prompt(c.prompt)
        prompt_ids = prompts[key]
        if len(prompt_ids) >= max_len:
            raise GptlineError(f"dpo.data: {c.source}: the prompt is {len(prompt_ids)} tokens, which leaves no room "
                               f"for an answer in {max_len} (dpo.max_len, or the SFT model's context)")  # fmt: skip
        chosen = answer_encoding(template, c.prompt, prompt_ids, c.chosen, c.source)
        rejected = answer_encoding(template, c.prompt, prompt_ids, c.rejected, c.source)
        longest = max(len(chosen[0]), len(rejected[0])) - 1  # a sequence's inputs: its tokens but the last
        if longest > max_len:
            skipped.add("longer_than_context", f"{c.source} ({longest} > {max_len})")
            return None
        return (*chosen, *rejected, np.array([c.weight])), c.prompt

    splits = split_comparisons(comparisons, encode, cfg.seed, cfg.validation_fraction, f"dpo.data {patterns}",
                               skipped)  # fmt: skip
    held_out_prompts = list({json.dumps(p): p for _, p in splits["validation"]}.values())
    splits = {split: [pair for pair, _ in items] for split, items in splits.items()}
    counts = {"comparisons": len(comparisons), "train_pairs": len(splits["train"]),
              "validation_pairs": len(splits["validation"]), "skipped": skipped.summary()}  # fmt: skip
    return splits, counts, held_out_prompts


def collate(pairs: list[tuple | None], pad_id: int, capacity: int):
    """A micro-batch of pairs packed into rows: (inputs, targets, segments, sequence) with `sequence` numbering the
    chosen answers 1..P and the rejected ones P+1..2P (0: padding), then each pair's weight and index (-1 for an
    empty slot, a zero-weight pair with no trained token)."""
    empty = (np.array([pad_id, pad_id]), np.zeros(2, bool), np.array([pad_id, pad_id]), np.zeros(2, bool),
             np.array([0.0]), np.array([-1]))  # fmt: skip
    pairs = [p if p is not None else empty for p in pairs]
    sequences = [(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs]
    rows = []
    for number, (ids, trained) in enumerate(sequences, start=1):
        inputs, targets = training_row(ids, trained)
        rows.append((inputs, targets, np.full(len(inputs), number)))
    packed = pack_rows(rows, capacity, (pad_id, IGNORE_INDEX, 0))
    inputs, targets, sequence = packed.columns
    weight = np.array([float(p[4][0]) for p in pairs])
    index = np.array([int(p[5][0]) for p in pairs])
    return inputs, targets, packed.segments, sequence, weight, index


def answer_logps(model, rows: tuple[torch.Tensor, ...], count: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Per sequence (1..count): the summed log-probability of its trained tokens and their number; and the logits."""
    inputs, targets, segments, sequence = rows
    logits, _ = model(inputs, segments=segments)
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view_as(targets)  # fmt: skip
    trained = (targets != IGNORE_INDEX).to(token_logps.dtype)
    where = sequence.flatten().clamp(min=1) - 1
    real = (sequence.flatten() > 0).to(token_logps.dtype)
    sums = torch.zeros(count, dtype=token_logps.dtype, device=inputs.device)
    tokens = torch.zeros(count, dtype=token_logps.dtype, device=inputs.device)
    sums = sums.index_add(0, where, (token_logps * trained).flatten() * real)
    tokens = tokens.index_add(0, where, trained.flatten() * real)
    return sums, tokens, logits


# ---- the stage -------------------------------------------------------------------------------------------------
def run(cfg: DPOConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    micro = micro_batch("dpo", cfg, ctx.resources.num_workers)
    context = json.loads((inputs["sft"] / "config.json").read_text())["gptline"]["max_seq_len"]
    if cfg.max_len > context:
        raise GptlineError(f"dpo.max_len={cfg.max_len} is longer than the SFT model's context of {context}")
    max_len = cfg.max_len or context
    splits, counts, held_out_prompts = prepare(cfg, inputs, ChatTemplate(inputs["sft"]), max_len)
    total_steps = epoch_steps("dpo", cfg, len(splits["train"]), "pairs")
    save_ragged(out_dir / PAIRS, {f"{split}_{column}": [p[i] for p in pairs] for split, pairs in splits.items()
                                  for i, column in enumerate(COLUMNS)})  # fmt: skip
    (out_dir / "data.json").write_text(json.dumps(counts, indent=2) + "\n")
    skipped = {reason: entry["count"] for reason, entry in counts["skipped"].items()}
    if not ctx.quiet:
        print(f"[dpo] {counts['train_pairs']} training / {counts['validation_pairs']} held-out pairs, "
              f"{total_steps} steps, loss {cfg.loss.kind}; skipped {skipped}", flush=True)  # fmt: skip
    recipe = DPORecipe(
        cfg, str(inputs["sft"]), str(out_dir), micro, max_len, tuple(held_out_prompts[: cfg.num_samples])
    )
    final = train("dpo", recipe, Schedule.of(cfg, total_steps), cfg.deepspeed, cfg.seed, ctx, out_dir)
    return {**final, "train_pairs": counts["train_pairs"], "skipped_records": sum(skipped.values())}


@dataclass(frozen=True)
class DPORecipe:
    cfg: DPOConfig
    sft: str  # the SFT model's artifact: the policy's start, the reference, the tokenizer and the chat template
    work_dir: str  # where the stage function wrote the pairs and the workers keep the reference's log-probs
    micro_batch: int
    row_capacity: int  # tokens per packed row: the longest a sequence may be
    prompts: tuple  # held-out prompts answered in the samples

    def models(self) -> dict[str, TrainedModel]:
        return {"model": TrainedModel(load(Path(self.sft)), self.cfg.optim, self.micro_batch, self.cfg.grad_accum)}

    def task(self, engines: dict[str, Any], rank: int, world: int) -> DPOTask:
        return DPOTask(self, engines["model"], rank, world)

    def export(self, weights: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
        final = load(Path(self.sft))
        final.load_state_dict(weights["model"])
        export(final, out_dir, Path(self.sft), ChatTemplate(Path(self.sft)).ids)


class DPOTask(SupervisedTask):
    headline = ("loss", "tokens_per_s", "val_loss", "val_accuracy", "val_kl")

    def __init__(self, recipe: DPORecipe, engine, rank: int, world: int):
        cfg = recipe.cfg
        self.cfg, self.recipe, self.prompts = cfg, recipe, [list(p) for p in recipe.prompts]
        self.template = ChatTemplate(Path(recipe.sft))
        pad, capacity = self.template.ids["pad"], recipe.row_capacity
        columns = load_ragged(Path(recipe.work_dir) / PAIRS, *(f"{s}_{c}" for s in SPLITS for c in COLUMNS))
        train_set, validation_set = ([(*pair, np.array([i])) for i, pair in
                                      enumerate(zip(*(columns[f"{s}_{c}"] for c in COLUMNS), strict=True))]
                                     for s in SPLITS)  # fmt: skip
        # The reference is the SFT model as it was loaded: frozen, in the engine's precision, beside it.
        self.reference = load(Path(recipe.sft)).to(engine.device, next(engine.module.parameters()).dtype).eval()
        self.reference.requires_grad_(False)

        def batch(pairs):
            return collate(pairs, pad, capacity)

        micro = recipe.micro_batch
        train_pairs = ExampleLoader(train_set, batch, micro, rank, world, cfg.seed, what="training pairs")
        self.validation = ExampleLoader(validation_set, batch, micro, rank, world, cfg.seed, shuffle=False,
                                        require_full_batch=False)  # fmt: skip
        super().__init__("dpo", engine, train_pairs, cfg.grad_accum, cfg.guard, rank)
        self.reference_logps = (self._reference_logps(train_set, batch, rank, world) if cfg.loss.uses_reference
                                else torch.zeros(len(train_set), 2, dtype=torch.float64))  # fmt: skip

    def _reference_logps(self, pairs: list, batch, rank: int, world: int) -> torch.Tensor:
        """(pairs, 2): the reference's log-probabilities of each training pair's chosen and rejected answer, read
        from the work directory or, the first time, computed by every rank for its share and written there."""
        path = Path(self.recipe.work_dir) / REFERENCE
        if path.exists():
            with np.load(path, allow_pickle=False) as stored:
                return torch.from_numpy(stored["logps"])
        found = torch.zeros(len(pairs), 2, dtype=torch.float64)
        mine = pairs[rank::world]
        size = 4 * self.recipe.micro_batch  # no activations are kept for a backward pass: larger batches fit
        with torch.no_grad():
            for start in range(0, len(mine), size):
                *rows, _, index = to_device(batch(mine[start : start + size]), self.engine.device)
                sums, _, _ = answer_logps(self.reference, tuple(rows), 2 * len(index))
                found[index.cpu()] = sums.double().view(2, -1).t().cpu()
        all_reduce_sum(found)
        if rank == 0:
            partial = path.with_name(REFERENCE + ".tmp.npz")
            np.savez(partial, logps=found.numpy())
            os.replace(partial, path)
        barrier()
        return found

    def pair_outputs(self, batch):
        """The preference loss's output for the batch, its log-probabilities and weight, and the logits."""
        *rows, weight, index = to_device(batch, self.engine.device)
        pairs = len(index)
        sums, tokens, logits = answer_logps(self.engine, tuple(rows), 2 * pairs)
        reference = self.reference_logps[index.cpu().clamp(min=0)].to(sums)
        tokens = tokens.clamp(min=1)
        logps = PairLogProbs(sums[:pairs], sums[pairs:], reference[:, 0], reference[:, 1], tokens[:pairs],
                             tokens[pairs:])  # fmt: skip
        return preference_losses(self.cfg.loss, logps), logps, weight.to(sums), logits

    def loss(self, batch) -> torch.Tensor:
        out, _, weight, _ = self.pair_outputs(batch)
        return weighted_mean(out.losses, weight)

    def tokens(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Over the whole held-out split (see the module docstring); the reference's log-probabilities and
        distributions come from the frozen copy."""
        self.validation.rewind()
        self.engine.eval()
        # pairs, correct (ties half), margin, chosen logp, rejected logp, weighted loss, weight, KL sum, KL tokens
        total = torch.zeros(9, dtype=torch.float64)
        for batch in self.validation.epoch_batches():
            *rows, weight, index = to_device(batch, self.engine.device)
            pairs = len(index)
            sums, tokens, logits = answer_logps(self.engine, tuple(rows), 2 * pairs)
            ref_sums, _, ref_logits = answer_logps(self.reference, tuple(rows), 2 * pairs)
            tokens = tokens.clamp(min=1)
            logps = PairLogProbs(sums[:pairs], sums[pairs:], ref_sums[:pairs], ref_sums[pairs:], tokens[:pairs],
                                 tokens[pairs:])  # fmt: skip
            out = preference_losses(self.cfg.loss, logps)
            real = (index >= 0).cpu()
            margin = (out.chosen_rewards - out.rejected_rewards).double().cpu()[real]
            w = weight.double().cpu()[real]
            trained = rows[1] != IGNORE_INDEX
            policy_dist, ref_dist = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
            kl = (policy_dist.exp() * (policy_dist - ref_dist)).sum(-1)[trained].double()
            total += torch.stack([real.sum().double(), ((margin > 0).double() + 0.5 * (margin == 0).double()).sum(),
                                  margin.sum(), sums[:pairs].double().cpu()[real].sum(),
                                  sums[pairs:].double().cpu()[real].sum(), (w * out.losses.double().cpu()[real]).sum(),
                                  w.sum(), kl.sum().cpu(), torch.tensor(float(kl.numel()), dtype=torch.float64)])  # fmt: skip
        self.engine.train()
        pairs, correct, margin, chosen, rejected, loss, weight, kl, kl_tokens = all_reduce_sum(total).tolist()
        n = max(1.0, pairs)
        return {"val_loss": loss / max(weight, 1e-12), "val_accuracy": correct / n, "val_margin": margin / n,
                "val_chosen_logp": chosen / n, "val_rejected_logp": rejected / n,
                "val_kl": kl / max(1.0, kl_tokens)}  # fmt: skip

    def samples(self) -> list[str]:
        with generating(self.engine.module) as model:
            return answer_prompts(model, self.template, self.prompts, self.cfg.sample_tokens, self.cfg.seed)


def report(directory: Path) -> list[dict[str, Any]]:
    """Preference loss, held-out implicit-reward accuracy and margin, log-probabilities, and KL to the reference."""
    return log_sections(directory, [("preference loss", ("loss", "val_loss")),
                                    ("held-out implicit-reward accuracy", ("val_accuracy",)),
                                    ("held-out reward margin", ("val_margin",)),
                                    ("held-out answer log-probability", ("val_chosen_logp", "val_rejected_logp")),
                                    ("KL to the reference per answer token (held out)", ("val_kl",))])  # fmt: skip
