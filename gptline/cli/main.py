"""The `gptline` command (also `python -m gptline`).

    gptline run [OVERRIDE ...] [-m] [--dry-run] [--until STAGE ...] [--only STAGE ...]
    gptline resume RUN_ID [OVERRIDE ...] [--trust-record]
    gptline status [RUN_ID]
    gptline ls [STAGE]
    gptline show STAGE/VERSION [--verify]
    gptline diff RUN_A RUN_B | STAGE/V1 STAGE/V2
    gptline gc [--dry-run] [--force] [--min-age-s S]
    gptline report [RUN_ID]
    gptline submit [OVERRIDE ...] --address http://HEAD:8265 [--no-wait]
    gptline tune SPEC.yaml [OVERRIDE ...]
    gptline import PATH [OVERRIDE ...]
    gptline plan --model llama-65b --tokens 1.4e12 --gpus 2048 [--gpu a100-80gb --zero 3 --mfu 0.4]

Overrides are Hydra's (`pretrain.lr=3e-4`, `cluster=remote`, `-m ppo.lr=1e-6,3e-6`). User errors print one line
and exit 2; `--debug` shows the traceback. A run that finishes with a failed stage exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from gptline.cli import chat, diff, plan
from pipeline.artifacts import LOCK, PARTIAL, Store, content_hash
from pipeline.config import DEFAULT_CONFIG_DIR, RunConfig, compose_config, load_config, parse_overrides
from pipeline.dag import DAG, config_value, load_registry
from pipeline.errors import GptlineError, RunStopped
from pipeline.redact import redact_config, redact_text, remember, restore_redacted, secret_values
from pipeline.report import write_report
from pipeline.runner import WORKER_ENV, Runner, RunRecord, as_built, connect_ray, list_runs, new_run_id
from pipeline.tune import load_spec, tune

DEFAULT_REGISTRY = "stages:REGISTRY"
# Config keys whose values decide which code runs (besides the registry): checked by resume against the record.
CODE_KEYS = ("cluster.runtime_env", "ppo.reward", "grpo.reward")
GC_MIN_AGE_S = 3600.0  # a partial directory younger than this may belong to a build that just started
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Never uploaded with a submitted job: environments, stores, caches, VCS data.
SUBMIT_EXCLUDES = [".venv", ".venv-trl", "store", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "wandb"]


@dataclass(frozen=True)
class CommandSpec:
    """A command that works on a model rather than on a run (`chat`, `sample`, `plan`). When it takes one, the CLI
    resolves its ARTIFACT argument (a directory, STAGE/VERSION, or a stage name for its newest artifact) to a local
    directory in `args.path`."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]  # (argparse parser) -> None; ARTIFACT is added by the CLI
    run: Callable[[Any], int]  # (argparse namespace) -> exit code
    takes_artifact: bool = True


MODEL_COMMANDS = [
    CommandSpec("chat", "talk to a chat model (sft, ppo, dpo) in the terminal", chat.add_chat_arguments, chat.run_chat),
    CommandSpec("sample", "continue a prompt with a base model (pretrain)", chat.add_sample_arguments, chat.run_sample),
    CommandSpec(
        "plan",
        "parameters, FLOPs, memory per GPU and days of a pretraining run",
        plan.add_arguments,
        plan.run,
        takes_artifact=False,
    ),
]


def _default_store() -> str:
    return os.environ.get("GPTLINE_STORE", "store")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic sweeper semantics: `a=1,2 b=x,y` gives the 4 points of the cartesian product."""
    return [point for batch in BasicSweeper.split_arguments(parse_overrides(overrides), None) for point in batch]


def _start_run(args: argparse.Namespace, dag: DAG, overrides: list[str], config: dict) -> tuple[str, bool, Store]:
    store = Store(config["store"]["root"])
    selection = dag.select(args.until or (), args.only or (), config)
    run_id = args.run_id or new_run_id()
    rebuild = tuple(getattr(args, "rebuild", None) or ())
    dag.check_known(rebuild)
    runner = Runner(dag, config, store, selection, run_id, rebuild)  # bad input data fails here, before any write
    if not args.dry_run:
        store.check_writable()
        if args.run_id and store.exists(store.path("runs", run_id)):
            raise GptlineError(f"--run-id {run_id}: a run with this id is already in {store.uri}")
    plans = runner.plan()
    print(f"plan for run {run_id} (store {store.uri}):")
    print(_table([[p.stage, p.version, p.action] for p in plans], ["stage", "version", "action"]))
    if args.dry_run:
        return run_id, True, store
    runner.record.write_config(config)
    runner.record.write_meta(
        {
            "run_id": run_id,
            "status": "pending",
            "created": time.time(),
            "registry": args.registry,
            "overrides": overrides,
            "selection": selection,
            "nodes": [[p.stage, p.version] for p in plans],  # a list: JSON objects lose order
            "argv": sys.argv[1:],
        }
    )
    ok = runner.execute(plans)
    print()
    print_status(store, run_id)
    print(f"artifacts: {store.uri}   (gptline ls, gptline show STAGE/VERSION)")
    print(f"report:    {write_report(store, dag, run_id, Path(config['run']['scratch_dir']).expanduser())}")
    _raise_if_stopped(runner)  # also ends a sweep: its later points do not start
    return run_id, ok, store


def _raise_if_stopped(runner: Runner) -> None:
    if runner.sigterm:
        raise RunStopped(f"run {runner.run_id} was stopped by SIGTERM; `gptline resume {runner.run_id}` continues it")


def cmd_run(args: argparse.Namespace) -> int:
    specs = load_registry(args.registry)
    dag = DAG(specs)
    if not dag.order:
        print(f"no stages are registered in {args.registry} yet: there is nothing to run.")
        return 0
    points = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    if args.run_id and len(points) > 1:
        raise GptlineError("--run-id names one run; a sweep makes one per point")
    if args.parallel < 1:
        raise GptlineError(f"--parallel {args.parallel}: must be >= 1")
    parallel = min(args.parallel, len(points))
    if parallel > 1 and args.dry_run:
        parallel = 1

    # Composed here, one after another: Hydra's global state is not thread-safe.
    configs = [compose_config(specs, overrides, Path(args.config_dir)) for overrides in points]

    def point(i: int) -> tuple[int, list[str], str, bool, Store]:
        if args.multirun:
            print(redact_text(f"\n== sweep point {i}: {' '.join(points[i]) or '(defaults)'}"), flush=True)
        return (i, points[i], *_start_run(args, dag, points[i], configs[i]))

    if parallel == 1:
        outcomes = [point(i) for i in range(len(points))]
    else:  # one Ray for every point; each point's runner builds what is missing, build leases keep builds single
        started = connect_ray(configs[0]["cluster"])
        try:
            with ThreadPoolExecutor(parallel) as pool:
                outcomes = list(pool.map(point, range(len(points))))
        finally:
            if started:
                ray.shutdown()
    if args.multirun and not args.dry_run:
        print("\n" + redact_text(sweep_summary(outcomes)))
    return 0 if all(ok for _, _, _, ok, _ in outcomes) else 1


def sweep_summary(outcomes: list[tuple[int, list[str], str, bool, Store]]) -> str:
    """One row per point: its overrides, run, state, the last stage's headline metrics, and the artifact versions
    that differ between points; the versions every point shares (built once) below the table."""
    versions, metrics = [], []
    for _, _, run_id, _, store in outcomes:
        record = RunRecord(store, run_id, Path("."))
        nodes = [tuple(n) for n in record.meta().get("nodes", [])]
        versions.append(dict(nodes))
        metrics.append(_metrics(as_built(store, *nodes[-1], record.node(nodes[-1][0]))) if nodes else "")
    stages = list(dict.fromkeys(s for v in versions for s in v))
    shared = [s for s in stages if len({v.get(s) for v in versions}) == 1]
    differing = [s for s in stages if s not in shared]
    common = set.intersection(*(set(o) for _, o, *_ in outcomes))  # shown once, not in every row
    rows = [[str(i), " ".join(x for x in o if x not in common), run_id, "done" if ok else "failed", m,
             " ".join(f"{s}/{v.get(s, '-')}" for s in differing)]
            for (i, o, run_id, ok, _), v, m in zip(outcomes, versions, metrics, strict=True)]  # fmt: skip
    table = _table(rows, ["point", "overrides", "run", "status", "metrics", "versions"])
    if common:
        table += "\nevery point also: " + " ".join(sorted(common))
    return table + "\nshared by every point: " + (" ".join(f"{s}/{versions[0][s]}" for s in shared) or "nothing")


def check_code_settings(recorded: dict[str, Any], local: dict[str, Any], trust_record: bool) -> None:
    """The store is not trusted with code: whoever can write it must not choose what runs. Each code-bearing
    setting of a run record must equal this command line's and local config's, or `--trust-record` accept it."""
    differing = [f"{key}: the record has {recorded.get(key)!r}, this command has {local.get(key)!r}"
                 for key in sorted(local) if recorded.get(key) != local[key]]  # fmt: skip
    if differing and not trust_record:
        raise GptlineError("the run record names other code than this command line and config would run ("
                           + "; ".join(differing) + "); give the same settings, or --trust-record to run the "
                           "record's (only for a store that nobody else can write)")  # fmt: skip


def code_settings(registry: str, config: dict[str, Any]) -> dict[str, Any]:
    """What decides which code runs: the registry module, the runtime env (pip packages, py_modules, working_dir,
    environment), and every module a config names (CODE_KEYS); compared in their redacted form."""
    settings = {"registry": registry}
    for key in CODE_KEYS:
        settings[key] = redact_config(config_value(config, key))
    return settings


def set_config_value(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(config.get(key), dict):
            return
        config = config[key]
    config[leaf] = value


def cmd_resume(args: argparse.Namespace) -> int:
    store = Store(args.store)
    record = RunRecord(store, args.run_id, Path("."))
    meta = record.meta()
    specs = load_registry(meta["registry"] if args.trust_record else args.registry)
    local = compose_config(specs, args.overrides, Path(args.config_dir))
    recorded = record.config()
    check_code_settings(code_settings(meta["registry"], recorded), code_settings(args.registry, local),
                        args.trust_record)  # fmt: skip
    config = restore_redacted(recorded, local)  # secrets come from this command line and environment
    if not args.trust_record:
        for key in CODE_KEYS:  # the local value itself (the record's is redacted)
            set_config_value(config, key, config_value(local, key))
    dag = DAG(specs)
    config = load_config(specs, config)
    remember(secret_values(config))
    runner = Runner(dag, config, store, meta["selection"], args.run_id)
    plans = runner.plan()
    print(f"resuming run {args.run_id}:")
    print(_table([[p.stage, p.version, p.action] for p in plans], ["stage", "version", "action"]))
    ok = runner.execute(plans)
    print()
    print_status(store, args.run_id)
    _raise_if_stopped(runner)
    return 0 if ok else 1


def _run_id(text: str) -> str:
    if not RUN_ID_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id (letters, digits, '-', '_')")
    return text


# The interpreter of the cluster's Ray: the raylet starts its Python workers with it (its --python_worker_command),
# and a job's entrypoint is a shell whose parent, Ray's job supervisor, is one of those workers; the shell walks up
# its ancestors to the raylet. The first `python` on the node's PATH may be another one, without Ray (a cluster
# started as `.venv/bin/ray start`); it is only the fallback where there is no /proc.
RAY_PYTHON = (
    'p=$PPID; PY=; while [ -z "$PY" ] && [ "${p:-0}" -gt 1 ]; do'
    " PY=$(tr '\\0' '\\n' < /proc/$p/cmdline 2>/dev/null | sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p');"
    " p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status 2>/dev/null); done"
)


def job_entrypoint(python_args: list[str]) -> str:
    """The shell command a Ray Job runs: `python_args` under the cluster's Python (`python` where /proc is not)."""
    return f'{RAY_PYTHON}; exec "${{PY:-python}}" {shlex.join(python_args)}'


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit `gptline run` to a cluster as a Ray Job: the working directory travels with it (runtime_env), the
    run id is chosen here so the caller knows it at once, and the store must be one every node and this client
    can reach (an object store URI, or an absolute path on a shared filesystem)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not args.address:
        raise GptlineError("gptline submit needs --address http://HEAD:8265 (or RAY_API_SERVER_ADDRESS)")
    specs = load_registry(args.registry)
    points = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    # Every point's config is checked here, before anything is sent.
    configs = [compose_config(specs, [*overrides, "cluster=remote"], Path(args.config_dir)) for overrides in points]
    config, root = configs[0], configs[0]["store"]["root"]
    for point in configs:
        shared = point["store"]["root"]
        if "://" not in shared and not os.path.isabs(shared):
            raise GptlineError(f"store.root={shared!r}: a cluster run needs shared storage every node reaches "
                               "(s3://..., gs://..., hdfs://..., or an absolute path on a shared filesystem)")  # fmt: skip
    run_id = new_run_id()  # a sweep's job is named by it; its points get their own run ids
    selection: list[str] = ["-m", "--parallel", str(args.parallel)] if args.multirun else ["--run-id", run_id]
    for name in ("until", "only"):
        if getattr(args, name):
            selection += [f"--{name}", *getattr(args, name)]
    try:  # the job runs in a copy of this directory, so the config tree must be inside it
        config_dir = Path(args.config_dir).resolve().relative_to(Path.cwd())
    except ValueError:
        raise GptlineError(f"--config-dir {args.config_dir}: must be inside the working directory "
                           f"{Path.cwd()}, which is what the job uploads") from None  # fmt: skip
    command = ["-m", "gptline", "run", "--registry", args.registry, "--config-dir", str(config_dir),
               *selection, "cluster=remote", "cluster.address=auto", *args.overrides]  # fmt: skip
    runtime_env = dict(config["cluster"]["runtime_env"] or {})
    runtime_env.setdefault("working_dir", ".")
    runtime_env["excludes"] = sorted({*SUBMIT_EXCLUDES, *(runtime_env.get("excludes") or [])})
    # `ray job stop` (and a SIGTERM to this command, which calls it) sends the driver SIGTERM: its training stages
    # checkpoint before they stop. Ray kills the job after RAY_JOB_STOP_WAIT_TIME_S (3 s unless told), too soon.
    grace = {"RAY_JOB_STOP_WAIT_TIME_S": "300"}
    runtime_env["env_vars"] = {**WORKER_ENV, **grace, **(runtime_env.get("env_vars") or {})}
    try:
        client = JobSubmissionClient(args.address)
        job = client.submit_job(entrypoint=job_entrypoint(command), submission_id=f"gptline-{run_id}",
                                runtime_env=runtime_env, metadata={"gptline_run_id": run_id})  # fmt: skip
    except (ConnectionError, RuntimeError) as e:
        raise GptlineError(f"submitting to {args.address} failed: {e} (token auth: RAY_AUTH_MODE=token and the "
                           "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token)") from e  # fmt: skip
    follow = f"gptline status {'' if args.multirun else run_id + ' '}--store {root}"
    what = f"a sweep of {len(points)} points" if args.multirun else f"run {run_id}"
    print(f"submitted {what} as Ray job {job} to {args.address} (store {root})", flush=True)
    if args.no_wait:
        print(f"follow it: ray job logs -f {job} --address {args.address}; {follow}")
        return 0

    def stop_job() -> None:
        print(f"\nSIGTERM: stopping Ray job {job}; its running training stages checkpoint first", flush=True)
        client.stop_job(job)

    async def stream() -> None:  # a SIGTERM (Slurm's notice before the time limit, see cluster/) stops the job
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.run_in_executor(None, stop_job))
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on: {follow}", file=sys.stderr)
        return 130
    status = client.get_job_status(job)
    print(f"{what}: Ray job {job} {status.value.lower()}")
    if status == JobStatus.STOPPED and not args.multirun:
        print(f"continue it on a cluster node: RAY_ADDRESS=auto gptline resume {run_id} --store {root}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def cmd_tune(args: argparse.Namespace) -> int:
    spec = load_spec(Path(args.spec))
    specs = load_registry(args.registry)
    dag = DAG(specs)
    stage = spec.objective.split(".")[0]
    dag.check_known([stage])
    args.run_id, args.dry_run, args.only = None, False, None
    args.until = args.until or [stage]

    def trial(overrides: list[str]) -> tuple[str, dict[str, Any] | None]:
        overrides = [*overrides, *args.overrides]
        print(f"\n== trial: {' '.join(overrides)}", flush=True)
        run_id, ok, store = _start_run(args, dag, overrides, compose_config(specs, overrides, Path(args.config_dir)))
        return run_id, (RunRecord(store, run_id, Path(".")).node(stage).get("metrics") or {}) if ok else None

    results = tune(spec, trial)
    rows = [[str(r["trial"]), " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in r["params"].items()),
             "failed" if r["value"] is None else f"{r['value']:.4g}", r["run"]] for r in results]  # fmt: skip
    print("\n" + _table(rows, ["trial", "params", spec.objective, "run"]))
    finished = [r for r in results if r["value"] is not None]
    if not finished:
        return 1
    pick = max if spec.direction == "maximize" else min
    best = pick(finished, key=lambda r: r["value"])
    print(f"best: trial {best['trial']} {spec.objective}={best['value']:.4g} with "
          + " ".join(f"{k}={v}" for k, v in best["params"].items()))  # fmt: skip
    return 0


def hydra_quoted(value: str) -> str:
    """`value` as a quoted string of Hydra's override grammar (a URI's '=', '&' or ',' would be syntax)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cmd_import(args: argparse.Namespace) -> int:
    """The Hugging Face model at PATH as a committed `import` artifact: a run of that one stage, with
    `base_model=hf base_model.path=PATH`. Its version is the hash of the files, so importing them again, or running
    with the same base_model settings, reuses it."""
    specs = load_registry(args.registry)
    overrides = ["base_model=hf", f"base_model.path={hydra_quoted(args.path)}", *args.overrides]
    config = compose_config(specs, overrides, Path(args.config_dir))
    args.only, args.until, args.run_id, args.dry_run = ["import"], None, None, False
    run_id, ok, store = _start_run(args, DAG(specs), overrides, config)
    node = RunRecord(store, run_id, Path(".")).node("import")
    if ok:
        print(f"imported {args.path} as import/{node['version']}: start from it with base_model=hf "
              f"base_model.path={hydra_quoted(args.path)}")  # fmt: skip
    return 0 if ok else 1


def _duration(node: dict[str, Any]) -> str:
    return f"{node['seconds']:.1f} s" if node.get("seconds") else ""


def _metrics(node: dict[str, Any], limit: int = 3) -> str:
    """The first numeric metrics in the order the stage returned them (its headline figures first)."""
    metrics = node.get("metrics") or {}
    order = [k for k in node.get("headline", []) if k in metrics] + sorted(metrics)
    numeric = [k for k in dict.fromkeys(order) if isinstance(metrics[k], int | float)]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in numeric[:limit])


def _driver_gone(meta: dict[str, Any]) -> bool:
    if meta.get("status") != "running" or meta.get("driver_host") != socket.gethostname():
        return False
    try:
        os.kill(meta["driver_pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError):
        return False
    return False


def cmd_status(args: argparse.Namespace) -> int:
    store = Store(args.store)
    runs = list_runs(store)
    if not runs:
        print(f"no runs in {store.uri}")
        return 0
    print_status(store, args.run_id or runs[-1])
    return 0


def print_status(store: Store, run_id: str) -> None:
    record = RunRecord(store, run_id, Path("."))
    meta = record.meta()
    status = meta.get("status", "?")
    if _driver_gone(meta):
        status += " (driver gone: `gptline resume " + run_id + "` continues it)"
    print(f"run {run_id}: {status}")
    rows = []
    for stage, version in meta.get("nodes", []):
        node = record.node(stage)
        state = node.get("state", "pending")
        if node.get("error"):
            state += f": {node['error']}"
        node = as_built(store, stage, version, node)
        if "built" in node:
            state += f" (built {_age(time.time() - node['built'])} ago)"
        rows.append([stage, version, state, _duration(node), _metrics(node)])
    print(_table(rows, ["stage", "version", "state", "duration", "metrics"]))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def cmd_report(args: argparse.Namespace) -> int:
    store = Store(args.store)
    runs = list_runs(store)
    if not runs:
        raise GptlineError(f"no runs in {store.uri}")
    run_id = args.run_id or runs[-1]
    registry = RunRecord(store, run_id, Path(".")).meta().get("registry", DEFAULT_REGISTRY)
    check_code_settings({"registry": registry}, {"registry": args.registry}, args.trust_record)
    print(write_report(store, DAG(load_registry(registry)), run_id, Path(args.scratch).expanduser()))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    store = Store(args.store)
    rows = []
    for a in store.list(args.stage):
        files = a.manifest.get("files", {})
        size = sum(f["size"] for f in files.values())
        end = a.manifest.get("timings", {}).get("end")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(end)) if end else ""
        rows.append([a.stage, a.version, when, str(len(files)), f"{size / 1e6:.2f} MB", a.manifest.get("run_id", "")])
    print(
        _table(rows, ["stage", "version", "built", "files", "size", "run"]) if rows else f"no artifacts in {store.uri}"
    )
    return 0


def _print_lineage(node: dict[str, Any], depth: int = 0) -> None:
    print("  " * depth + ("└─ " if depth else "") + node["ref"] + ("  (missing)" if node.get("missing") else ""))
    for child in node["inputs"]:
        _print_lineage(child, depth + 1)


def cmd_show(args: argparse.Namespace) -> int:
    store = Store(args.store)
    artifact = store.find(args.ref)
    if args.verify:
        store.verify(artifact, full=True)
        print(f"verified: every file of {artifact.ref} matches its sha256")
        print(f"content: {content_hash(artifact.manifest.get('files', {}))} (equal for two builds exactly when "
              "every file is)")  # fmt: skip
    print(json.dumps(artifact.manifest, indent=2, sort_keys=True))
    print("\nlineage:")
    _print_lineage(store.lineage(artifact.stage, artifact.version))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove artifacts no run record refers to (with their inputs), stale leases, and partial directories nobody
    builds or will resume. Never touched: a version whose lease is live. Kept unless --force: the partial
    directories of runs not done (`gptline resume` continues them) and those written within --min-age-s."""
    store = Store(args.store)
    keep: set[str] = set()
    resumable: set[str] = set()
    for run_id in list_runs(store):
        meta = RunRecord(store, run_id, Path(".")).meta()
        nodes = meta.get("nodes", [])
        if meta.get("status") != "done":
            resumable |= {store.artifact_path(s, v) for s, v in nodes}
        stack = [f"{s}/{v}" for s, v in nodes]
        while stack:
            ref = stack.pop()
            if ref in keep:
                continue
            keep.add(ref)
            stage, version = ref.split("/")
            if store.is_committed(stage, version):
                stack += [f"{s}/{v}" for s, v in store.load(stage, version, verify="none").inputs.items()]
    leases = store.leases(args.lease_ttl_s)
    doomed = [path + LOCK for path, live in leases.items() if not live]
    for path in store.uncommitted():
        version = path.removesuffix(PARTIAL)
        if leases.get(version):
            print(f"keeping {path}: its build lease is live")
        elif not args.force and version in resumable:
            print(f"keeping {path}: a run that is not done needs it (gptline resume; --force removes it)")
        elif not args.force and store.age_s(path) < args.min_age_s:
            print(f"keeping {path}: written within --min-age-s {args.min_age_s:g} (--force removes it)")
        else:
            doomed.append(path)
    doomed += [a.path for a in store.list() if a.ref not in keep and not leases.get(a.path)]
    for path in doomed:
        print(("would remove " if args.dry_run else "removing ") + path)
        if not args.dry_run:
            store.delete(path)
    if not doomed:
        print("nothing to collect")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    store_opt = argparse.ArgumentParser(add_help=False)
    store_opt.add_argument("--store", default=_default_store(), help="store root (default: $GPTLINE_STORE or ./store)")

    pipeline_opts = argparse.ArgumentParser(add_help=False)  # for the commands that compose a config
    pipeline_opts.add_argument("--registry", default=os.environ.get("GPTLINE_REGISTRY", DEFAULT_REGISTRY))
    pipeline_opts.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR))

    run_opts = argparse.ArgumentParser(add_help=False)  # what `run` and `submit` share: selection and sweeps
    run_opts.add_argument("-m", "--multirun", action="store_true", help="sweep: one run per override combination")
    run_opts.add_argument("--parallel", type=int, default=1, metavar="N", help="sweep points run N at a time")
    run_opts.add_argument("--until", nargs="+", metavar="STAGE", help="run these stages and what they need")
    run_opts.add_argument("--only", nargs="+", metavar="STAGE", help="run only these (their inputs must be committed)")

    parser = argparse.ArgumentParser(prog="gptline", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        parents=[common, pipeline_opts, run_opts],
        help="compose the config and run the pipeline",
        usage="gptline run [OVERRIDE ...] [options]   (Hydra overrides such as pretrain.lr=3e-4, anywhere)",
    )
    run.add_argument("--rebuild", nargs="+", metavar="STAGE", default=[],
                     help="build these again even though committed (an artifact found corrupt)")  # fmt: skip
    run.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    run.add_argument("--run-id", type=_run_id, help="the id to record the run under (gptline submit sets it)")
    run.set_defaults(func=cmd_run)

    tune_cmd = sub.add_parser(
        "tune",
        parents=[common, pipeline_opts],
        help="search config knobs with Optuna: one pipeline run per trial",
        usage="gptline tune SPEC.yaml [OVERRIDE ...] [--until STAGE ...]",
    )
    tune_cmd.add_argument("spec", help="the search: objective STAGE.METRIC, direction, trials, params (conf/tune/)")
    tune_cmd.add_argument("--until", nargs="+", metavar="STAGE", help="default: the objective's stage")
    tune_cmd.set_defaults(func=cmd_tune)

    submit = sub.add_parser(
        "submit",
        parents=[common, pipeline_opts, run_opts],
        help="run the pipeline on a Ray cluster as a Ray Job and stream its logs",
        usage="gptline submit [OVERRIDE ...] --address http://HEAD:8265 [--no-wait]",
    )
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="the cluster's dashboard (Jobs API), e.g. http://head:8265; default $RAY_API_SERVER_ADDRESS")  # fmt: skip
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.set_defaults(func=cmd_submit)

    import_cmd = sub.add_parser(
        "import",
        parents=[common, pipeline_opts],
        help="a Llama-architecture Hugging Face model (directory or object-store URI) as an artifact",
        usage="gptline import PATH [OVERRIDE ...]   (store.root=... as for run)",
    )
    import_cmd.add_argument("path", help="a Hugging Face model directory, or an object-store URI (s3://...)")
    import_cmd.set_defaults(func=cmd_import)

    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust-record", action="store_true",
                       help="run the code the run record names (registry, runtime env, reward modules) even where "
                            "this command line and config name other code")  # fmt: skip
    resume = sub.add_parser("resume", parents=[common, store_opt, pipeline_opts, trust],
                            help="continue a failed or interrupted run",
                            usage="gptline resume RUN_ID [OVERRIDE ...] [options]   (the overrides give what the "
                                  "record does not keep: secrets, and the code settings to check)")  # fmt: skip
    resume.add_argument("run_id", type=_run_id)
    resume.set_defaults(func=cmd_resume)

    status = sub.add_parser("status", parents=[common, store_opt], help="a run's stages and their states")
    status.add_argument("run_id", nargs="?", type=_run_id)
    status.set_defaults(func=cmd_status)

    ls = sub.add_parser("ls", parents=[common, store_opt], help="list committed artifacts")
    ls.add_argument("stage", nargs="?")
    ls.set_defaults(func=cmd_ls)

    show = sub.add_parser("show", parents=[common, store_opt], help="an artifact's manifest and lineage")
    show.add_argument("ref", help="STAGE/VERSION (a unique version prefix is enough)")
    show.add_argument("--verify", action="store_true", help="check every file's sha256")
    show.set_defaults(func=cmd_show)

    diff_cmd = sub.add_parser("diff", parents=[common, store_opt], help="config differences of two runs or artifacts")
    diff.add_arguments(diff_cmd)
    diff_cmd.set_defaults(func=lambda args: diff.run(args, DEFAULT_REGISTRY))

    report = sub.add_parser("report", parents=[common, store_opt, trust], help="write a run's HTML report")
    report.add_argument("run_id", nargs="?", type=_run_id, help="default: the newest run")
    report.add_argument("--registry", default=os.environ.get("GPTLINE_REGISTRY", DEFAULT_REGISTRY),
                        help="the stages whose report hooks draw the run (checked against the record's)")  # fmt: skip
    report.add_argument("--scratch", default="~/.cache/gptline/scratch", help="local copies of remote artifacts")
    report.set_defaults(func=cmd_report)

    gc = sub.add_parser("gc", parents=[common, store_opt], help="remove partial and unreferenced artifacts")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--min-age-s", type=float, default=GC_MIN_AGE_S,
                    help="keep partial directories written more recently than this (default %(default)s)")  # fmt: skip
    gc.add_argument("--lease-ttl-s", type=float, default=RunConfig.lock_ttl_s,
                    help="a lease without a heartbeat for this long is stale (default: run.lock_ttl_s's)")  # fmt: skip
    gc.add_argument("--force", action="store_true",
                    help="also remove recent partial directories and those of runs not done (never a leased one)")  # fmt: skip
    gc.set_defaults(func=cmd_gc)

    for command in MODEL_COMMANDS:
        extra = sub.add_parser(command.name, parents=[common, store_opt], help=command.help)
        if command.takes_artifact:
            extra.add_argument("artifact", help="an exported model directory, STAGE/VERSION, or a stage (its newest)")
        command.add_arguments(extra)
        extra.set_defaults(func=lambda args, _command=command: _run_command(_command, args))
    return parser


def _run_command(command: CommandSpec, args: argparse.Namespace) -> int:
    """Resolve ARTIFACT to a local directory (`args.path`), then run the command."""
    if not command.takes_artifact:
        return command.run(args)
    if Path(args.artifact, "config.json").exists():
        args.path = Path(args.artifact)
    else:
        store = Store(args.store)
        if "/" in args.artifact:
            artifact = store.find(args.artifact)
        else:
            found = store.list(args.artifact) if args.artifact in store.stages() else []
            if not found:
                raise GptlineError(f"{args.artifact!r} is neither a model directory nor a stage with a committed "
                                   f"artifact in {store.uri}")  # fmt: skip
            artifact = found[-1]
        args.path = Path(artifact.path)
        if not args.path.exists():
            raise GptlineError(f"{artifact.ref} is in a remote store; copy it to a local directory first")
    return command.run(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # Overrides may stand before, between or after options, so they are whatever argparse does not know.
    args, extra = parser.parse_known_args(argv)
    unknown_options = [a for a in extra if a.startswith("-")]
    if unknown_options or (extra and args.command not in ("run", "submit", "tune", "import", "resume")):
        parser.error(f"unrecognized arguments: {' '.join(unknown_options or extra)}")
    # `--only ppo ppo.iterations=3`: nargs="+" swallows the override; stage names never hold "=".
    for option in ("only", "until", "rebuild"):
        names = getattr(args, option, None) or []
        extra += [n for n in names if "=" in n]
        if names:
            setattr(args, option, [n for n in names if "=" not in n] or None)
    args.overrides = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except GptlineError as e:
        if args.debug:
            raise
        print(f"gptline: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
