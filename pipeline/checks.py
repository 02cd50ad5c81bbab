"""Range checks shared by config dataclasses' `validate()` methods, which return (field, problem) pairs."""

from __future__ import annotations

from typing import Any


def at_least(config: Any, minimum: float, *keys: str) -> list[tuple[str, str]]:
    """A problem for every named field below `minimum`."""
    return [
        (key, f"must be >= {minimum}, got {getattr(config, key)}") for key in keys if getattr(config, key) < minimum
    ]
