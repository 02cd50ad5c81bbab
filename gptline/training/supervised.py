"""Tasks whose step is a loss over batches (pretrain, sft, rm, dpo): gradient accumulation behind a loss guard.

`SupervisedTask.step` runs `grad_accum` micro-batches of the stage's `loss(batch)`. Each micro-batch's loss (its
mean over ranks, so every rank decides alike) is judged by the `LossGuard` before its backward pass: a non-finite
loss, or a spike beyond `z_score` deviations over the window of accepted losses, is never applied and the next batch
takes its place; `max_consecutive` bad ones in a row raise `RollBack` (fit restores the last checkpoint and the data
moves on). `NextTokenTask` adds what pretrain and sft share: next-token loss on (inputs, targets[, segments]) rows
and the held-out loss. `answer_prompts` samples a chat model's answers to held-out prompts.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from gptline.data.chat import ChatTemplate, Message
from gptline.model.generate import SamplingConfig, generate
from gptline.model.gpt import GPT, IGNORE_INDEX
from gptline.training.collectives import all_reduce_sum, mean_over_ranks
from gptline.training.config import GuardConfig
from gptline.training.fit import RollBack
from pipeline.faults import fault_armed


class Resumable(Protocol):
    """A training batch source: endless, and restorable to its exact position."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LossGuard:
    """Judges each micro-batch's loss before its backward pass (see the module docstring)."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive = self.skipped = self.rollbacks = 0

    def judge(self, loss: float) -> str | None:
        reason = None
        if not math.isfinite(loss):
            reason = "nonfinite"
        elif len(self.history) >= self.cfg.window // 2:
            mean, std = float(np.mean(self.history)), float(np.std(self.history))
            if loss > mean + self.cfg.z_score * max(std, 1e-3 * abs(mean), 1e-8):
                reason = "spike"
        if reason is None:
            self.history.append(loss)
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.skipped += 1
        return reason

    def must_roll_back(self) -> bool:
        return self.consecutive >= self.cfg.max_consecutive

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.skipped, self.rollbacks = state["skipped"], state["rollbacks"]


@contextlib.contextmanager
def generating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode without gradients, its compiled blocks (`compile_blocks`) run eager: decoding's
    one-position steps are not worth a graph of their own."""
    model.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield model
    finally:
        model.train()


def answer_prompts(model: GPT, template: ChatTemplate, prompts: list[list[Message]], max_new: int,
                   seed: int) -> list[str]:  # fmt: skip
    """Each prompt's last user turn and the model's sampled answer to the conversation (a chat stage's samples)."""
    if not prompts:
        return []
    encoded = [template.prompt(p) for p in prompts]
    room = model.cfg.max_seq_len - max(len(e) for e in encoded)
    if room < 1:
        return []
    sampling = SamplingConfig(max_new_tokens=min(max_new, room), temperature=0.7, top_k=40)
    completions = generate(model, encoded, sampling, stop_ids=[template.end_of_turn], pad_id=template.ids["pad"],
                           generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return [f"{p[-1]['content']!r} -> {template.decode(c)!r}" for p, c in zip(prompts, completions, strict=True)]


class SupervisedTask:
    """The step of a loss-based stage; a stage's task subclasses it with `loss`, `tokens`, `evaluate` and `samples`."""

    headline = ("loss", "tokens_per_s", "mfu", "val_loss", "val_accuracy")
    flops_per_token = 0.0

    def __init__(self, stage: str, engine, train: Resumable, grad_accum: int, guard: GuardConfig, rank: int):
        self.stage, self.engine, self.train, self.grad_accum, self.rank = stage, engine, train, grad_accum, rank
        self.guard = LossGuard(guard)
        self.steps_taken = 0

    def loss(self, batch: Any) -> torch.Tensor:
        """The micro-batch's scalar loss (forward only; the step does the backward)."""
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Tokens the batch trains on (for tokens/s)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def samples(self) -> list[str]:
        return []

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def step(self, step: int) -> dict[str, float]:
        losses: list[float] = []
        tokens = 0
        while len(losses) < self.grad_accum:
            batch = next(self.train)
            loss = self.loss(batch)
            if fault_armed(f"{self.stage}.nan_loss_{step + 1}"):  # fault tests inject a NaN here
                loss = loss * float("nan")
            mean = mean_over_ranks(loss.detach().float())
            reason = self.guard.judge(mean)
            if reason is None:
                self.engine.backward(loss)
                self.engine.step()
                losses.append(mean)
                tokens += self.tokens(batch)
                continue
            # Never applied: no backward, so DeepSpeed's gradients and counters are untouched.
            if self.rank == 0:
                print(f"[{self.stage}] step {step + 1}: {reason} loss {mean:.4g}, batch skipped", flush=True)
            if self.guard.must_roll_back():
                self.guard.rollbacks += 1
                self.guard.consecutive = 0
                raise RollBack
        return {"loss": sum(losses) / len(losses), "tokens": tokens, "skipped_batches": self.guard.skipped,
                "rollbacks": self.guard.rollbacks}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.train.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])


def to_device(arrays: tuple[np.ndarray, ...], device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a).to(device) for a in arrays)


class NextTokenTask(SupervisedTask):
    """Next-token loss on rows of (inputs, targets) or, packed, (inputs, targets, segments); targets of
    IGNORE_INDEX do not count. The held-out loss is averaged over the first `eval_batches` validation batches."""

    def __init__(self, stage: str, engine, train, validation, eval_batches: int, grad_accum: int,
                 guard: GuardConfig, rank: int):  # fmt: skip
        super().__init__(stage, engine, train, grad_accum, guard, rank)
        self.validation, self.eval_batches = validation, eval_batches

    def loss(self, batch) -> torch.Tensor:
        inputs, targets, *segments = to_device(batch, self.engine.device)
        return self.engine(inputs, targets, segments=segments[0] if segments else None)[1]

    def tokens(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.validation.rewind()
        self.engine.eval()
        total = torch.zeros(2)
        for _, batch in zip(range(self.eval_batches), self.validation.epoch_batches(), strict=False):
            valid = float(self.tokens(batch))
            total += torch.tensor([float(self.loss(batch)) * valid, valid])
        self.engine.train()
        all_reduce_sum(total)
        return {"val_loss": float(total[0] / total[1].clamp(min=1))}
