"""A small built-in few-shot task set for base models: plain-text completions scored by log-likelihood.

The recipe's point about base models is that they complete documents, so a task is posed as a document to
continue ("The capital of France is") and the model's answer is the choice it gives the highest log-probability
(lm-evaluation-harness's `acc`). Each item's distractors are other items' answers (or nearby numbers), so every
item has `CHOICES` options and chance is 1/`CHOICES`. A k-shot prompt puts the k items before it, answered, one per
line. The items are written out here, not downloaded: the set must exist on a machine with no hub access.
"""

from __future__ import annotations

from dataclasses import dataclass

CHOICES = 4


@dataclass(frozen=True)
class Item:
    context: str  # the document so far, e.g. "The capital of France is"
    answer: str  # the correct continuation, with its leading space
    choices: tuple[str, ...]  # the answer among CHOICES continuations


CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Canada", "Ottawa"),
    ("Greece", "Athens"),
    ("England", "London"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Cuba", "Havana"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("early", "late"),
    ("open", "closed"),
    ("rich", "poor"),
    ("full", "empty"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("high", "low"),
    ("long", "short"),
    ("strong", "weak"),
    ("first", "last"),
    ("left", "right"),
    ("true", "false"),
    ("inside", "outside"),
]
SUMS = [
    (a, b)
    for a, b in [
        (1, 2),
        (2, 3),
        (3, 4),
        (4, 1),
        (5, 2),
        (2, 6),
        (7, 1),
        (3, 3),
        (4, 4),
        (6, 3),
        (5, 4),
        (8, 1),
        (2, 2),
        (1, 1),
        (3, 5),
        (6, 2),
        (4, 5),
        (7, 2),
        (1, 6),
        (5, 5),
    ]
]


def _rotated_choices(answers: list[str], i: int) -> tuple[str, ...]:
    """The answer of item i and the answers of the next CHOICES-1 items, in a per-item rotated order."""
    options = [answers[(i + k) % len(answers)] for k in range(CHOICES)]
    shift = i % CHOICES
    return tuple(options[shift:] + options[:shift])


def _sum_choices(total: int, i: int) -> tuple[str, ...]:
    options = [total + d for d in (0, 1, -1, 2)]
    shift = i % CHOICES
    return tuple(f" {n}" for n in options[shift:] + options[:shift])


def _items() -> dict[str, list[Item]]:
    capitals = [f" {city}" for _, city in CAPITALS]
    opposites = [f" {b}" for _, b in OPPOSITES]
    return {
        "capitals": [
            Item(f"The capital of {country} is", capitals[i], _rotated_choices(capitals, i))
            for i, (country, _) in enumerate(CAPITALS)
        ],
        "opposites": [
            Item(f"The opposite of {a} is", opposites[i], _rotated_choices(opposites, i))
            for i, (a, _) in enumerate(OPPOSITES)
        ],
        "sums": [Item(f"{a} + {b} =", f" {a + b}", _sum_choices(a + b, i)) for i, (a, b) in enumerate(SUMS)],
    }


TASKS: dict[str, list[Item]] = _items()


def prompt(task: list[Item], i: int, shots: int) -> str:
    """Item i's context after `shots` other items of the task, answered, one per line."""
    examples = [task[(i - k) % len(task)] for k in range(shots, 0, -1)]
    return "".join(f"{e.context}{e.answer}.\n" for e in examples) + task[i].context
