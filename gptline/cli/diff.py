"""`gptline diff A B`: what differs between two runs (RUN_A RUN_B) or two artifacts of a stage (STAGE/V1
STAGE/V2), and what each difference rebuilt.

Every config key whose value differs is listed with both values and its kind: `versioned` (part of its stage's
version), `unversioned` (a measuring field the version leaves out: it rebuilt nothing) or `not versioned` (the
pipeline's own groups: store, run, cluster, tracking). For two runs, a versioned difference names the stages whose
artifact versions differ because of it: its own stage and those after it. For two artifacts, their input versions
and their content (`content` in the manifest: one hash over every file) are compared too, so two builds of one
version with different files (a live crawl, say) show as such; `--other-store` finds B in another store.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact, Store
from pipeline.config import flatten
from pipeline.dag import DAG, load_registry
from pipeline.errors import GptlineError
from pipeline.runner import RunRecord

UNVERSIONED, VERSIONED, NOT_VERSIONED = "unversioned", "versioned", "not versioned"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="a run id, or STAGE/VERSION (a unique version prefix is enough)")
    parser.add_argument("b", help="the same kind as A")
    parser.add_argument("--other-store", help="the store B is in (default: --store)")


def run(args: argparse.Namespace, default_registry: str) -> int:
    stores = Store(args.store), Store(args.other_store or args.store)
    if ("/" in args.a) != ("/" in args.b):
        raise GptlineError(f"diff {args.a} {args.b}: compare two runs or two artifacts (STAGE/VERSION), not one each")
    lines = _artifacts(*stores, args.a, args.b) if "/" in args.a else _runs(*stores, args.a, args.b, default_registry)
    print("\n".join(lines))
    return 0


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ (missing on one side counts), sorted."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _show(value: Any) -> str:
    return "<absent>" if value is None else str(value)


def _runs(store_a: Store, store_b: Store, run_a: str, run_b: str, default_registry: str) -> list[str]:
    records = RunRecord(store_a, run_a, Path(".")), RunRecord(store_b, run_b, Path("."))
    for store, record in zip((store_a, store_b), records, strict=True):
        if not store.exists(record.path + "/run.json"):
            raise GptlineError(f"no run {record.run_id!r} in {store.uri}")
    configs = [record.config() for record in records]
    metas = [record.meta() for record in records]
    specs = load_registry(metas[1].get("registry") or default_registry)
    dag = DAG(specs)
    versions = [dict(map(tuple, meta.get("nodes", []))) for meta in metas]
    owners = {spec.key: spec for spec in specs}
    unversioned = {k for config in configs for spec in specs if spec.key in config
                   for k in flatten(spec.unversioned(config[spec.key]), spec.key)}  # fmt: skip
    flat = [flatten(config) for config in configs]
    lines = [f"{'key':<40} {run_a:<24} {run_b:<24} kind / rebuilt"]
    for key in _changes(*flat):
        owner = owners.get(key.split(".")[0])
        if owner is None:
            kind = NOT_VERSIONED
        elif key in unversioned:
            kind = UNVERSIONED + ": rebuilt nothing"
        else:
            after = [s for s in dag.order if s == owner.name or owner.name in dag.ancestors(s, configs[1])]
            rebuilt = [s for s in after if s in versions[0] and s in versions[1] and versions[0][s] != versions[1][s]]
            kind = f"{VERSIONED}: rebuilt {' '.join(rebuilt) or 'nothing'}"
        lines.append(f"{key:<40} {_show(flat[0].get(key)):<24} {_show(flat[1].get(key)):<24} {kind}")
    if len(lines) == 1:
        lines.append("(no config differences)")
    shared = [s for s in dag.order if s in versions[0] and versions[0][s] == versions[1].get(s)]
    lines.append(f"same artifacts in both: {' '.join(f'{s}/{versions[0][s]}' for s in shared) or 'none'}")
    return lines


def _artifacts(store_a: Store, store_b: Store, ref_a: str, ref_b: str) -> list[str]:
    a, b = store_a.find(ref_a), store_b.find(ref_b)
    if a.stage != b.stage:
        raise GptlineError(
            f"diff {a.ref} {b.ref}: two artifacts of one stage are compared, got {a.stage} and {b.stage}"
        )
    configs = [flatten(x.manifest.get("config") or {}, a.stage) for x in (a, b)]
    unversioned = {k for x in (a, b) for k in flatten(x.manifest.get("unversioned") or {}, a.stage)}
    lines = [f"{'key':<40} {a.ref:<24} {b.ref:<24} kind"]
    for key in _changes(*configs):
        kind = UNVERSIONED if key in unversioned else VERSIONED
        lines.append(f"{key:<40} {_show(configs[0].get(key)):<24} {_show(configs[1].get(key)):<24} {kind}")
    for name in _changes(a.inputs, b.inputs):
        lines.append(f"input {name:<34} {_show(a.inputs.get(name)):<24} {_show(b.inputs.get(name)):<24} {VERSIONED}")
    if len(lines) == 1:
        lines.append("(no config or input differences)")
    lines.append(_content_line(a, b))
    return lines


def _content_line(a: Artifact, b: Artifact) -> str:
    ca, cb = a.manifest.get("content"), b.manifest.get("content")
    if ca is None or cb is None:
        return "content: not recorded (an artifact committed before content hashes)"
    if ca == cb:
        return f"content: identical ({ca[:12]})"
    same = " under the same version" if a.version == b.version else ""
    return f"content: DIFFERENT{same} ({ca[:12]} vs {cb[:12]}): the files differ"
