"""Which config fields enter an artifact's version.

Every field of a stage's config does, except those its dataclass declares with `unversioned(...)`: fields that only
decide what is measured, logged or how often state is saved (an evaluation cadence, the prompts sampled for the
log). The rule for marking one: two runs that differ only in it write bit-identical artifact files (the metrics and
logs may differ), which a test proves for every marked field. A marked field that draws random numbers draws them
from a generator of its own, so the training stream never sees it.

`split(config_class, data)` cuts a stage's resolved config subtree (plain data) into the part that is hashed into
the version and the unversioned values, which the manifest records beside it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from typing import Any

VERSIONED = "versioned"  # the field metadata key; False marks a field as left out of the version


def unversioned(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field left out of the artifact version (see the module docstring for when that is allowed)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={VERSIONED: False})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unversioned_names(cls: type) -> set[str]:
    """Fields marked unversioned by the class or any dataclass it extends: a subclass that only gives such a field
    another default (`eval_every: int = 50`) leaves it unversioned."""
    return {f.name for base in cls.__mro__ if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)
            if not f.metadata.get(VERSIONED, True)}  # fmt: skip


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds directly (`Cfg`, `Cfg | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    candidates = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
    return candidates[0] if len(candidates) == 1 and typing.get_origin(hint) is not dict else None


def mapped_dataclass(hint: Any) -> type | None:
    """The dataclass a `dict[str, Cfg]` field maps its keys to, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]
    return None


def split(config_class: type, data: Any) -> tuple[Any, dict[str, Any]]:
    """(the versioned part of `data`, the unversioned values) for a config subtree of `config_class`."""
    if not dataclasses.is_dataclass(config_class) or not isinstance(data, Mapping):
        return data, {}
    hints, marked = _hints(config_class), _unversioned_names(config_class)
    kept: dict[str, Any] = {}
    left: dict[str, Any] = {}
    for key, value in data.items():
        if key in marked:
            left[key] = value
            continue
        hint = hints.get(key)
        inner, mapped = _dataclass_in(hint), mapped_dataclass(hint)
        if inner is not None:
            kept[key], sub = split(inner, value)
            if sub:
                left[key] = sub
        elif mapped is not None and isinstance(value, Mapping):
            kept[key], subs = {}, {}
            for name, item in value.items():
                kept[key][name], sub = split(mapped, item)
                if sub:
                    subs[name] = sub
            if subs:
                left[key] = subs
        else:
            kept[key] = value
    return kept, left


def unversioned_fields(config_class: type, prefix: str = "") -> Iterator[str]:
    """The dotted names of every unversioned field of `config_class`, nested dataclasses included."""
    hints, marked = _hints(config_class), _unversioned_names(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in marked:
            yield prefix + f.name
        elif (inner := _dataclass_in(hints.get(f.name))) is not None:
            yield from unversioned_fields(inner, f"{prefix}{f.name}.")
