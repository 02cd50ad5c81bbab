"""Tasks with one checkable answer: their records, a generated arithmetic set, and the exact-answer reward.

A task record is a prompt record (`{"prompt": str}` or `{"messages": [...]}`, as ppo reads) with the expected
`answer` as a string. The reward `exact_answer(texts, references)` takes an answer's final answer (the last
`[...]` in it, else its last number, else its last line) and scores 1 when it equals the reference, 0 otherwise:
numbers compare by value (`4.0000` equals `4`, `1,440` equals `1440`), anything else by its text, case and
surrounding space aside. `held_out_reward` answers tasks greedily and averages a reward over them (grpo's
held-out accuracy, the same for any model).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from gptline.data.chat import BadRecord, Message, Skipped, jsonl_records, prompt_messages
from gptline.model.generate import SamplingConfig, generate

BRACKETED = re.compile(r"\[([^\[\]]*)\]")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def final_answer(text: str) -> str | None:
    """The answer's final answer: the last bracketed span, else the last number, else the last non-empty line."""
    bracketed = BRACKETED.findall(text)
    if bracketed:
        return bracketed[-1].strip()
    numbers = NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def canonical(answer: str) -> Decimal | str:
    """A number's value (commas between digits dropped), or the casefolded text."""
    text = answer.strip()
    if NUMBER.fullmatch(text):
        try:
            return Decimal(text.replace(",", ""))
        except InvalidOperation:
            pass
    return text.casefold()


def exact_answer(texts: list[str], references: list[str | None]) -> list[float]:
    """1.0 for an answer whose final answer equals its reference, 0.0 otherwise."""
    if any(r is None for r in references):
        raise ValueError("exact_answer needs every prompt record to carry its expected `answer`")
    scores = []
    for text, reference in zip(texts, references, strict=True):
        found = final_answer(text)
        scores.append(float(found is not None and canonical(found) == canonical(final_answer(reference) or "")))
    return scores


# ---- task records ---------------------------------------------------------------------------------------------
def read_tasks(
    patterns: list[str], key: str, skipped: Skipped, max_line_bytes: int
) -> list[tuple[str, list[Message], str | None]]:
    """(file:line, prompt messages, expected answer or None) of every prompt record of the matched files."""
    found = []
    for where, record in jsonl_records(patterns, key, skipped, max_line_bytes):
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str | int | float):
            skipped.add("answer_not_a_string_or_number", where)
            continue
        try:
            messages = prompt_messages(record.get("messages", record.get("prompt")), record.get("system"))
        except BadRecord as bad:
            skipped.add(str(bad), where)
            continue
        found.append((where, messages, None if answer is None else str(answer)))
    return found


def arithmetic_tasks(count: int, held_out: int, max_operand: int, operations: str, seed: int):
    """(train, held-out) records of distinct problems `a op b` with 0 <= a, b <= max_operand and op one of
    `operations` (of + - *); the two splits share no problem."""
    problems = [(a, op, b) for a in range(max_operand + 1) for op in operations for b in range(max_operand + 1)]
    if count + held_out > len(problems):
        raise ValueError(f"{count} + {held_out} problems asked, only {len(problems)} distinct ones exist")
    random.Random(seed).shuffle(problems)

    def record(a: int, op: str, b: int) -> dict[str, Any]:
        return {"prompt": f"What is {a} {op} {b}?", "answer": str(OPERATIONS[op](a, b))}

    chosen = [record(*p) for p in problems[: count + held_out]]
    return chosen[held_out:], chosen[:held_out]


# ---- held-out accuracy ----------------------------------------------------------------------------------------
@torch.no_grad()
def held_out_reward(model, template, tasks: list[tuple[list[int], str | None]], reward: Callable,
                    sampling: SamplingConfig, samples: int = 1, seed: int = 0, batch_size: int = 64) -> float:  # fmt: skip
    """The mean reward of answers to `tasks` ((prompt ids, reference) pairs): `samples` answers to each, drawn with
    `sampling` (greedy at temperature 0) from a generator seeded with `seed`; 0 for no tasks."""
    if not tasks:
        return 0.0
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    repeated = [task for task in tasks for _ in range(samples)]
    total = 0.0
    for lo in range(0, len(repeated), batch_size):
        chunk = repeated[lo : lo + batch_size]
        answers = generate(model, [p for p, _ in chunk], sampling, stop_ids=[template.end_of_turn],
                           pad_id=template.ids["pad"], generator=generator)  # fmt: skip
        total += sum(reward([template.decode(a) for a in answers], [r for _, r in chunk]))
    model.train(was_training)
    return total / len(repeated)
