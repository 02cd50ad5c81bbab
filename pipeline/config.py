"""Config: Hydra composition checked against structured configs, before any work starts.

The schema is one dataclass per group: the pipeline's own (`store`, `run`, `cluster`, `tracking`) plus one per
registered stage under its config key. It is registered in Hydra's ConfigStore as `gptline_schema` and named first
in `conf/config.yaml`'s defaults, so every YAML file and every override is merged onto typed nodes: an unknown key
or a wrong type fails during composition. Ranges are checked afterwards by each dataclass's `validate()`, which
returns (field, problem) pairs; errors always carry the key's full dotted name, and an unknown key comes with the
closest valid name.

A mapping of dataclasses (`data.sources`, `fetch.archives`, `cluster.resources`) takes new entries from the command
line, `+data.sources.NAME.type=warc` or `+data.sources.NAME={type: warc, paths: [...]}`, checked against the entry's
dataclass like any other key. OmegaConf cannot assign a plain dict to such a typed entry, so these overrides are
applied after Hydra's composition, as merges, in the order given.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pipeline import redact
from pipeline.dag import StageChoice, StageResources, StageSpec, stage_choices
from pipeline.errors import ConfigError
from pipeline.versioning import mapped_dataclass

SCHEMA_NAME = "gptline_schema"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
VERIFY_MODES = ("none", "size", "full")
TRACKING_MODES = ("offline", "online", "disabled")


@dataclass
class StoreConfig:
    root: str = "store"  # a local directory or any pyarrow.fs URI (s3://, gs://, hdfs://)
    verify: str = "full"  # how a stage's inputs are checked before it reads them: none, size or full sha256

    def validate(self) -> list[tuple[str, str]]:
        if self.verify not in VERIFY_MODES:
            return [("verify", f"must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")]
        return [] if self.root else [("root", "must not be empty")]


@dataclass
class RunConfig:
    max_retries: int = 2  # Ray retries of a failed stage task; each retry resumes from the stage's partial work
    lock_ttl_s: float = 120.0  # a build lease not refreshed for this long is taken over
    lock_heartbeat_s: float = 10.0
    scratch_dir: str = "~/.cache/gptline/scratch"  # local copies when the store is not a local filesystem
    quiet: bool = False

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.max_retries < 0:
            problems.append(("max_retries", f"must be >= 0, got {self.max_retries}"))
        if self.lock_heartbeat_s <= 0:
            problems.append(("lock_heartbeat_s", f"must be > 0, got {self.lock_heartbeat_s}"))
        if self.lock_ttl_s <= 2 * self.lock_heartbeat_s:
            problems.append(("lock_ttl_s", f"must exceed twice lock_heartbeat_s, got {self.lock_ttl_s}"))
        return problems


@dataclass
class ClusterConfig:
    name: str = "local"
    address: str | None = None  # None: start an embedded Ray; else "ray://host:10001", "auto", "host:6379"
    namespace: str = "gptline"
    num_cpus: int | None = None  # embedded Ray only; None uses every core
    runtime_env: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, StageResources] = field(default_factory=dict)  # per stage name, over the spec's

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.num_cpus is not None and self.num_cpus < 1:
            problems.append(("num_cpus", f"must be >= 1, got {self.num_cpus}"))
        for stage, res in self.resources.items():
            problems += [(f"resources.{stage}.{key}", msg) for key, msg in res.validate()]
        return problems


@dataclass
class TrackingConfig:
    mode: str = "offline"  # offline (default: nothing leaves the machine), online, disabled
    project: str = "gptline"
    entity: str | None = None

    def validate(self) -> list[tuple[str, str]]:
        if self.mode not in TRACKING_MODES:
            return [("mode", f"must be one of {', '.join(TRACKING_MODES)}, got {self.mode!r}")]
        return []


PIPELINE_GROUPS: dict[str, type] = {
    "store": StoreConfig,
    "run": RunConfig,
    "cluster": ClusterConfig,
    "tracking": TrackingConfig,
}


def _default_resources(specs: list[StageSpec]) -> dict[str, StageResources]:
    return {spec.name: dataclasses.replace(spec.resources) for spec in specs}


_SCHEMAS: dict[tuple, type] = {}  # build_schema's classes, by what each depends on


def build_schema(specs: list[StageSpec]) -> type:
    """The root structured config: pipeline groups plus each stage's config class under its key.

    Built once per registry: what it depends on (each spec's name, key, config class and resources, and the stage
    choices) is the cache key, so every compose and every record check of one registry shares one class."""
    choices = stage_choices(specs)
    shape = tuple((spec.name, spec.key, spec.config_class, dataclasses.astuple(spec.resources)) for spec in specs)
    cache_key = (shape, tuple(choices))
    if cache_key not in _SCHEMAS:
        _SCHEMAS[cache_key] = _new_schema(specs, choices)
    return _SCHEMAS[cache_key]


def _new_schema(specs: list[StageSpec], choices: list[StageChoice]) -> type:
    # Every stage's resources are in the tree from the start, so `cluster.resources.<stage>.num_workers=8`
    # overrides a default rather than needing Hydra's `+` to add a key.
    cluster = dataclasses.make_dataclass(
        "ClusterConfig",
        [("resources", dict[str, StageResources], field(default_factory=lambda: _default_resources(specs)))],
        bases=(ClusterConfig,),
    )
    fields: dict[str, type] = {**PIPELINE_GROUPS, "cluster": cluster}
    for spec in specs:
        if spec.key in fields and fields[spec.key] is not spec.config_class:
            raise ConfigError(f"config key {spec.key!r} of stage {spec.name!r} is already taken")
        fields[spec.key] = spec.config_class
    entries = [(name, cls, field(default_factory=cls)) for name, cls in fields.items()]
    for choice in choices:
        if choice.key in fields:
            raise ConfigError(f"config key {choice.key!r} of a stage choice is already taken")
        # A name or a list of names (`alignment=dpo`, `alignment=[ppo,dpo]`), checked by `load_config`.
        entries.append((choice.key, Any, field(default_factory=lambda c=choice: list(c.default))))
    return dataclasses.make_dataclass("GptlineConfig", entries)


def _schema_at(schema: type, dotted: str) -> type | None:
    """The dataclass at a dotted key of the schema, through mapping entries (`data.sources.NAME`), else None."""
    cls: Any = schema
    parts = dotted.split(".") if dotted else []
    i = 0
    while i < len(parts):
        hint = typing.get_type_hints(cls).get(parts[i]) if dataclasses.is_dataclass(cls) else None
        if (mapped := mapped_dataclass(hint)) is not None and i + 1 < len(parts):
            cls, i = mapped, i + 2
        elif dataclasses.is_dataclass(hint):
            cls, i = hint, i + 1
        else:
            return None
    return cls


def _mapping_entry(schema: type, key: str) -> tuple[str, str, list[str]] | None:
    """(the mapping's key, the entry's name, the path inside the entry) for a key inside a mapping of dataclasses."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        parent = _schema_at(schema, ".".join(parts[:i]))
        if parent is not None and mapped_dataclass(typing.get_type_hints(parent).get(parts[i])) is not None:
            return ".".join(parts[: i + 1]), parts[i + 1], parts[i + 2 :]
    return None


def _suggest(schema: type, full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    cls = _schema_at(schema, parent)
    if cls is None:
        return ""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    return f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""


def _apply_entry_override(cfg: DictConfig, override: Override, text: str, entry: tuple[str, str, list[str]]) -> None:
    """One override inside a mapping of dataclasses (`entry`: see `_mapping_entry`), applied to the composed config."""
    key = override.key_or_group
    mapping_key, name, inside = entry
    mapping = OmegaConf.select(cfg, mapping_key)
    if override.is_delete():
        if inside or name not in mapping:
            raise ConfigError(f"cannot delete config key '{key}': only an existing entry of '{mapping_key}' can go")
        with open_dict(mapping):
            del mapping[name]
        return
    value = override.value()
    if name not in mapping:
        if not (override.is_add() or override.is_force_add()):
            close = difflib.get_close_matches(name, [str(k) for k in mapping], n=1, cutoff=0.6)
            hint = f"did you mean '{mapping_key}.{close[0]}'? To" if close else "to"
            raise ConfigError(f"unknown config key '{mapping_key}.{name}'; {hint} add an entry: '+{text}'")
        patch: Any = value
        for part in reversed(inside):
            patch = {part: patch}
        with open_dict(mapping):
            mapping.merge_with({name: patch})
    else:
        OmegaConf.update(cfg, key, value, merge=True)


def _explain(error: BaseException, schema: type) -> ConfigError:
    """Turn Hydra/OmegaConf exceptions into one line naming the full key."""
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        full_key = str(cause.full_key)
        first_line = str(cause).splitlines()[0]
        if "not in" in first_line or "is not in struct" in first_line:
            return ConfigError(f"unknown config key '{full_key}'{_suggest(schema, full_key)}")
        return ConfigError(f"invalid value for config key '{full_key}': {first_line}")
    match = re.search(r"Could not override '([^']+)'", str(error))
    if match:
        return ConfigError(f"unknown config key '{match.group(1)}'{_suggest(schema, match.group(1))}")
    message = str(error).split("Config search path")[0]  # Hydra appends its search path: noise here
    return ConfigError(" ".join(message.split()))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A plain config tree as {dotted key: value}; lists and empty mappings are values."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    dot = f"{prefix}." if prefix else ""
    return {k: v for key, value in tree.items() for k, v in flatten(value, f"{dot}{key}").items()}


def validate(cfg: Any, prefix: str = "") -> None:
    """Run `validate()` on every dataclass in the tree and report the first problem by its full key."""
    if not dataclasses.is_dataclass(cfg):
        return
    if hasattr(cfg, "validate"):
        problems = cfg.validate()
        if problems:
            key, message = problems[0]
            raise ConfigError(f"invalid value for config key '{prefix}{key}': {message}")
    for f in dataclasses.fields(cfg):
        validate(getattr(cfg, f.name), f"{prefix}{f.name}.")


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's override grammar, with a syntax error naming the override it is in."""
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException as e:
            message = str(e).split(" See https://")[0]
            raise ConfigError(f"cannot parse override {text!r}: {' '.join(message.split())}") from e
    return parsed


def compose_config(
    specs: list[StageSpec], overrides: list[str], config_dir: Path = DEFAULT_CONFIG_DIR
) -> dict[str, Any]:
    """Compose conf/config.yaml with overrides, validate it, and return the resolved plain-data tree."""
    parsed = parse_overrides(overrides)
    schema = build_schema(specs)
    entry_of = [_mapping_entry(schema, o.key_or_group) for o in parsed]
    entries = [(o, text, e) for o, text, e in zip(parsed, overrides, entry_of, strict=True) if e is not None]
    rest = [text for text, e in zip(overrides, entry_of, strict=True) if e is None]
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            # The main conf/ tree stays on the search path, so another root config reuses its groups.
            search = f"hydra.searchpath=[file://{DEFAULT_CONFIG_DIR}]"
            cfg = compose(config_name="config", overrides=[search, *rest])
        for override, text, entry in entries:
            _apply_entry_override(cfg, override, text, entry)
    except (HydraException, OmegaConfBaseException) as e:
        raise _explain(e, schema) from e
    finally:
        GlobalHydra.instance().clear()
    resolved = load_config(specs, OmegaConf.to_container(cfg, resolve=True))
    redact.remember_config(resolved, OmegaConf.to_container(cfg, resolve=False))
    return resolved


def load_config(specs: list[StageSpec], data: dict[str, Any]) -> dict[str, Any]:
    """Check a resolved config tree (freshly composed, or read back from a run record) against the schema."""
    schema = build_schema(specs)
    try:
        typed = OmegaConf.merge(_structured(schema), data)
        validate(OmegaConf.to_object(typed))
        for choice in stage_choices(specs):
            for problem in choice.problems(OmegaConf.to_container(typed)[choice.key]):
                raise ConfigError(f"invalid value for config key '{choice.key}': {problem}")
        return OmegaConf.to_container(typed, resolve=True)
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from e


def typed(config_class: type, data: Any) -> Any:
    """The typed config object a stage receives."""
    return OmegaConf.to_object(OmegaConf.merge(_structured(config_class), data))


@functools.cache
def _structured(config_class: type) -> DictConfig:
    """A config class's defaults as a DictConfig, built once: half of checking a config is building this node, and
    `OmegaConf.merge` copies its first argument, so the cached node is never changed."""
    return OmegaConf.structured(config_class)
