"""One source of defaults: the config composed from conf/ with no overrides is exactly the groups' dataclass
defaults, and no file a default option loads restates one. Only catalogues (a mapping of dataclasses whose
dataclass default is empty: data.sources, fetch.archives) and interpolations (store.root from the environment)
live in YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from pipeline.config import DEFAULT_CONFIG_DIR, build_schema, compose_config, flatten
from stages import REGISTRY


def schema_defaults() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(build_schema(REGISTRY)), resolve=False)


def catalogues(defaults: dict[str, Any]) -> set[str]:
    """Keys whose dataclass default is an empty mapping: their content is data, kept in YAML."""
    return {key for key, value in flatten(defaults).items() if value == {}}


def default_option_files() -> dict[str, Path]:
    """The file of every group option the default composition loads, by the config key it fills ('' = root)."""
    found = {"": DEFAULT_CONFIG_DIR / "config.yaml"}
    pending = [("", DEFAULT_CONFIG_DIR, found[""])]
    while pending:
        key, directory, path = pending.pop()
        for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
            if isinstance(entry, dict):
                [(group, option)] = entry.items()
                child = directory / group / f"{option}.yaml"
                found[f"{key}{group.replace('/', '.')}"] = child
                pending.append((f"{key}{group}.", directory / group, child))
    return found


def test_the_default_config_is_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("GPTLINE_STORE", raising=False)
    defaults = schema_defaults()
    composed, expected = flatten(compose_config(REGISTRY, [])), flatten(defaults)
    owned_by_yaml = catalogues(defaults)
    differ = {k: (composed.get(k), expected.get(k)) for k in composed.keys() | expected.keys()
              if composed.get(k) != expected.get(k) and not any(k == c or k.startswith(c + ".") for c in owned_by_yaml)}  # fmt: skip
    assert differ == {}, "YAML and dataclass defaults disagree (composed, dataclass)"


def test_no_default_option_file_restates_a_dataclass_default():
    owned_by_yaml = catalogues(schema_defaults())
    restated = []
    for key, path in default_option_files().items():
        data = yaml.safe_load(path.read_text()) or {}
        data.pop("defaults", None)
        if not data:
            continue
        for leaf, value in flatten(data, key).items():
            is_catalogue = any(leaf == c or leaf.startswith(c + ".") for c in owned_by_yaml)
            if leaf and not is_catalogue and not (isinstance(value, str) and value.startswith("${")):
                restated.append(f"{path.relative_to(DEFAULT_CONFIG_DIR)}: {leaf}")
    assert restated == []
    assert len(default_option_files()) >= 13  # root, 10 stage and pipeline groups, pretrain's model and deepspeed
